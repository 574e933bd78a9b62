"""Standard (clean) training and PGD adversarial training (Madry et al. 2018).

PGD-AT minimises ``E[max_{||d|| <= eps} CE(f(x + d), y)]`` (Madry et al., Eq. 2.1):
the inner maximisation is PGD, the outer loss the mean cross-entropy on ``x'`` only,
as in MadryLab/cifar10_challenge.
"""

from __future__ import annotations

from typing import Any

from agad.objectives import base


def standard(model, *, label_smoothing: float = 0.0) -> base.Objective:
  """Clean empirical risk: mean CE on the clean batch, BN updated from clean images."""

  def generate(params, model_state, aux_state, batch, key, step):
    del params, model_state, aux_state, key, step
    return batch["image"]

  def loss(params, model_state, aux_state, batch, adv, key, step):
    del key, step
    out = base.forward(model, params, model_state, adv, mode="train", labels=batch["label"])
    value = base.cross_entropy_mean(out.logits, batch["label"], label_smoothing)
    return value, (out.model_state, aux_state, {"accuracy": base.accuracy(out.logits, batch["label"])})

  return base.Objective("standard", base.no_aux_state, generate, loss,
                        base.BNPolicy(attack="none", update="clean"))


def pgd_at(model, config: Any) -> base.Objective:
  """Madry PGD-AT: CE on PGD examples (``config.attack``); BN updated by the adversarial pass."""
  from agad.objectives import defaults  # defaults imports base; keep the import local.
  attack = defaults.TrainingAttack(model, config, None)
  clean = standard(model)

  def generate(params, model_state, aux_state, batch, key, step):
    del aux_state
    return attack(params, model_state, batch["image"], batch["label"], key, loss="ce", step=step)

  return clean._replace(name="pgd_at", generate=generate,
                        bn_policy=base.BNPolicy(attack=attack.bn, update="adversarial"))
