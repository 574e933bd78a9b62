"""Standard (clean) training: mean cross-entropy on the clean batch.

Optional label smoothing (AGKD-BML trains its teacher with 0.5 spread over the *other*
classes): ``smoothing="all"`` is PyTorch's ``1 - s + s/K`` on the true class and ``s/K``
elsewhere; ``"others"`` puts ``1 - s`` on the true class and ``s/(K-1)`` on each other
class. ``loss_on(model, name, pass_name)`` is the shared "CE on one train-mode pass"
loss that PGD-AT reuses on the adversarial batch.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from agad.objectives import base, defaults

# Fields and their comments stay aligned (the defaults are their own documentation).
# fmt: off
DEFAULTS = ml_collections.ConfigDict()
DEFAULTS.label_smoothing = 0.0   # s; 0 = plain CE (every base paper). AGKD-BML's teacher: 0.5.
DEFAULTS.smoothing = "all"       # all (PyTorch: s/K on every class) | others (s/(K-1) on the others).
# fmt: on


def loss_on(model, pass_name: str, *, label_smoothing: float = 0.0, smoothing: str = "all"):
  """``loss(...)``: mean CE of one train-mode pass over ``adv`` (the objective's input)."""

  def loss(params, model_state, aux_state, batch, adv, key, step):
    del step
    out = base.forward(
      model,
      params,
      model_state,
      adv,
      mode="train",
      labels=batch["label"],
      taps=base.ALL_TAPS,
      rng=base.pass_key(key, 0),
    )
    value = base.cross_entropy_mean(out.logits, batch["label"], label_smoothing, smoothing)
    metrics = {
      "accuracy" if pass_name == "clean" else "adv_accuracy": base.accuracy(
        out.logits, batch["label"]
      )
    }
    return value, base.LossAux(out.model_state, aux_state, metrics, {pass_name: out})

  return loss


def standard(
  model, config: Any = None, *, label_smoothing: float | None = None, smoothing: str | None = None
) -> base.Objective:
  """Clean empirical risk: mean CE on the clean batch, BN updated from clean images."""
  cfg = defaults.objective_config(config, "standard", DEFAULTS)
  label_smoothing = float(cfg.label_smoothing if label_smoothing is None else label_smoothing)
  smoothing = cfg.smoothing if smoothing is None else smoothing

  def generate(params, model_state, aux_state, batch, key, step):
    del params, model_state, aux_state, key, step
    return batch["image"]

  return base.Objective(
    "standard",
    base.no_aux_state,
    generate,
    loss_on(model, "clean", label_smoothing=label_smoothing, smoothing=smoothing),
    base.BNPolicy(attack="none", update="clean"),
  )


objective = standard
