"""Standard (clean) training and PGD adversarial training (Madry et al. 2018).

PGD-AT minimises ``E[max_{||d|| <= eps} CE(f(x + d), y)]`` (Madry et al., Eq. 2.1):
the inner maximisation is PGD, the outer loss the mean cross-entropy on ``x'`` only,
as in MadryLab/cifar10_challenge.
"""

from __future__ import annotations

from typing import Any

import jax

from agad.attacks import iterative as pgd_lib
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


def attack_from_config(model, attack_cfg: Any, *, loss: str = "ce"):
  """The training attack ``(params, model_state, batch, key) -> x_adv`` from ``config.attack``.

  ``attack_cfg`` fields: eps, step_size, steps, norm, random_start, bn ("eval"|"batch"),
  driver ("unroll" inside the train step on CPU; "loop" on GPU/TPU).
  """

  def run(params, model_state, batch, key, *, loss_override=None, random_start=None):
    logits_fn = base.logits_fn_for(model, params, model_state, mode=attack_cfg.bn)
    return pgd_lib.pgd(logits_fn, batch["image"], batch["label"], key, eps=attack_cfg.eps,
                       step_size=attack_cfg.step_size, steps=attack_cfg.steps, norm=attack_cfg.norm,
                       random_start=random_start or attack_cfg.random_start,
                       loss=loss_override or loss, driver=attack_cfg.driver)

  return run


def pgd_at(model, attack_cfg: Any) -> base.Objective:
  """Madry PGD-AT: CE on PGD examples; BN updated by the adversarial forward pass."""
  attack = attack_from_config(model, attack_cfg)
  clean = standard(model)

  def generate(params, model_state, aux_state, batch, key, step):
    del aux_state, step
    return attack(params, model_state, batch, key)

  return clean._replace(name="pgd_at", generate=generate,
                        bn_policy=base.BNPolicy(attack=attack_cfg.bn, update="adversarial"))
