"""AFA stage II (Wang et al., Sec. 4.2-4.3, Fig. 4b): ``--config=...:MODEL,afa_stage2``.

The method, both stages and the open choices are described in :mod:`agad.defenses.afa`
(stage I). This module is stage II: its ``config.objective.afa_stage2`` fields, the
deployed fusion norm (:func:`norm`, :class:`~agad.defenses._afa_norm.AFANorm`) and per-stage
weight generators (:func:`norm_hook`), the objective (:func:`afa_stage2`), the adaptive
"PGD+Ada" losses and the fusion-weight analysis (Fig. 6), and the recipe the configs apply
(:func:`recipe`). Stage II reads a stage-I run's weights from its checkpoint, not
its code: it imports nothing from :mod:`agad.defenses.afa`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from agad.attacks import losses as attack_losses
from agad.defenses import _afa_analysis
from agad.defenses._afa_norm import (
  LOGIT_NAME,
  AFANorm,
  AFAStageHook,
  kept_branches,
  per_example_mean,
  sown,
  w0_per_example,
)
from agad.objectives import base, defaults

WG_PERS = ("stage", "layer")  # one weight generator per stage (default) | per BN layer

_STRENGTH_SALT = 0x41464132

# Fields and their comments stay aligned (the defaults are their own documentation).
# fmt: off
DEFAULTS = ml_collections.ConfigDict()
DEFAULTS.num_branches = 5   # K of the stage-I run.
DEFAULTS.keep = (0, -1)     # kept branches: BN_0 and BN_{K-1} (Fig. 4b); W0 weights the first.
DEFAULTS.eps_max = 1.0      # xi_max / attack.eps; training strengths eps ~ U(0, xi_max).
DEFAULTS.wg_width = 16      # WG conv/hidden width (not in the paper).
DEFAULTS.wg_per = "stage"   # stage: one WG per stage on its input (plus stem/final norms) | layer: one per BN layer.
DEFAULTS.wg_out = "scalar"  # scalar W0 (Eq. 1) | channel (one per channel; wg_per=layer only).
DEFAULTS.freeze_stats = True  # kept branches use running statistics, never updated.
DEFAULTS.random_start = ml_collections.FieldReference(None, field_type=str)  # None: config.attack.
DEFAULTS.adaptive_ratios = "10:1,5:1,2:1,1:1,1:2,1:5,1:10"  # CE:BCE of the adaptive attacks (Sec. 5.2).
# fmt: on

# Stage II trains the weight generators only: freeze every other parameter (regex on
# '/'-joined paths, re.search) and let the WGs (absent from the stage-I run) keep their init.
STAGE2_FREEZE = r"^(?!(.*/)?wg/)"
STAGE2_KEEP_INIT = r"(^|/)wg/"


# Stage II's learning rate per dataset (paper Sec. 5.1: CIFAR 0.01, SVHN 0.001); Fashion-MNIST:
# one epoch at 0.005 decayed at half of it (this repository's short recipe).
STAGE2_RECIPES = {
  "cifar10": dict(lr=0.01),
  "cifar100": dict(lr=0.01),
  "svhn_cropped": dict(lr=0.001),
  "fashion_mnist": dict(lr=0.005, num_epochs=1, boundaries=(0.5,)),
}


def recipe(c, *, dataset: str, model: str, spec: str, smoke: bool) -> None:
  """:func:`stage2_recipe` with ``STAGE2_RECIPES[dataset]`` (any model; none for other datasets)."""
  del model, spec, smoke
  if dataset in STAGE2_RECIPES:
    stage2_recipe(c, **STAGE2_RECIPES[dataset])


def stage2_recipe(c, *, lr: float, num_epochs: float = 20, boundaries=(10,)):
  """Stage II's schedule and freezing on config ``c`` (paper Sec. 5.1: 20 epochs, decay
  x0.1 at epoch 10; lr 0.01 CIFAR-10 / 0.001 SVHN). ``init.workdir`` is the user's."""
  c.num_epochs = num_epochs
  c.optim.lr = lr
  c.optim.schedule = "piecewise"
  c.optim.boundaries = tuple(boundaries)
  c.optim.decay_factor = 0.1
  c.optim.warmup_epochs = 0.0
  c.attack.eps_warmup_steps = 0
  c.init.freeze = STAGE2_FREEZE
  c.init.keep_init = STAGE2_KEEP_INIT
  return c


def norm(config: Any):
  """Stage II's norm factory: :class:`AFANorm` (two kept branches + a weight generator)."""
  cfg = defaults.objective_config(config, "afa_stage2", DEFAULTS)
  kept_branches(int(cfg.num_branches), tuple(cfg.keep))  # fail early on a bad keep
  return functools.partial(
    AFANorm,
    num_branches=int(cfg.num_branches),
    keep=tuple(cfg.keep),
    wg_width=int(cfg.wg_width),
    wg_out=cfg.wg_out,
    freeze_stats=bool(cfg.freeze_stats),
    own_wg=_wg_per(cfg) == "layer",
  )


def norm_hook(config: Any):
  """Stage II's backbone norm hook: one :class:`AFAStageHook` per stage (``wg_per='stage'``),
  None for ``wg_per='layer'``."""
  cfg = defaults.objective_config(config, "afa_stage2", DEFAULTS)
  return (
    functools.partial(AFAStageHook, wg_width=int(cfg.wg_width)) if _wg_per(cfg) == "stage" else None
  )


def _wg_per(cfg) -> str:
  per = str(cfg.get("wg_per", "stage"))
  if per not in WG_PERS:
    raise ValueError(f"objective.afa_stage2.wg_per={per!r} is not one of {WG_PERS}")
  if per == "stage" and cfg.wg_out != "scalar":
    raise ValueError(
      f"objective.afa_stage2.wg_out={cfg.wg_out!r} needs wg_per='layer' (the layers "
      "of a stage differ in width); per stage the weight is a scalar"
    )
  return per


def parse_ratios(spec: str) -> list[tuple[float, float]]:
  """``"10:1,1:2"`` -> ``[(10.0, 1.0), (1.0, 2.0)]`` (CE weight, BCE weight)."""
  out = []
  for item in filter(None, (s.strip() for s in str(spec).split(","))):
    parts = item.split(":")
    try:
      a, b = (float(p) for p in parts)
    except ValueError:
      a = b = -1.0
    if len(parts) != 2 or a < 0 or b < 0 or a + b == 0:
      raise ValueError(
        f"adaptive ratio {item!r} in {spec!r} must be 'CE:BCE' with non-negative "
        "weights, e.g. '10:1,1:10'"
      )
    out.append((a, b))
  return out


def _ratio_name(a: float, b: float) -> str:
  fmt = lambda v: f"{v:g}".replace(".", "p")
  return f"ce{fmt(a)}_bce{fmt(b)}"


def adaptive_losses(ratios: list[tuple[float, float]]):
  """The adaptive-loss factory ``(net, variables) -> {variant: (x, labels) -> [B]}``:
  ``a CE(f(x), y) + b mean_layers softplus(WG logit)`` (= ``b BCE(W0, 0)``) through the
  eval-mode deployed model."""

  def adaptive_loss(net, variables):
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k not in ("params", "aux")}

    def make(a, b):
      def fn(x, labels):
        out = base.forward(net, params, model_state, x, mode="eval", labels=labels)
        bce = per_example_mean([jax.nn.softplus(z) for z in sown(out.aux, LOGIT_NAME)])
        return a * attack_losses.cross_entropy(out.logits, labels) + b * bce

      return fn

    return {_ratio_name(a, b): make(a, b) for a, b in ratios}

  return adaptive_loss


def afa_stage2(model, config: Any) -> base.Objective:
  """Stage II: train the weight generators with CE on random-strength attacks."""
  cfg = defaults.objective_config(config, "afa_stage2", DEFAULTS)
  init_cfg = getattr(config, "init", None)
  if init_cfg is None or not init_cfg.get("workdir") or not init_cfg.get("freeze"):
    raise ValueError(
      "afa_stage2 starts from a stage-I run with the backbone frozen: set "
      "--config.init.workdir=<stage-I workdir>, "
      f"--config.init.freeze='{STAGE2_FREEZE}' and --config.init.keep_init='{STAGE2_KEEP_INIT}' "
      "(configs/<dataset>.py:MODEL,afa_stage2 sets the last two)"
    )
  if float(cfg.eps_max) <= 0:
    raise ValueError(
      f"objective.afa_stage2.eps_max={cfg.eps_max} must be > 0 (a fraction of attack.eps)"
    )
  ratios = parse_ratios(cfg.adaptive_ratios)
  attack = defaults.TrainingAttack(
    model, config, {"random_start": cfg.random_start, "attack_bn": "eval"}
  )
  eps_max = float(cfg.eps_max) * float(attack.eps)
  step_max = float(cfg.eps_max) * float(attack.step_size)

  def strengths(key, batch_size):
    u = jax.random.uniform(jax.random.fold_in(key, _STRENGTH_SALT), (batch_size,))
    return u * eps_max, u * step_max

  def generate(params, model_state, aux_state, batch, key, step):
    del aux_state
    eps, step_size = strengths(key, batch["image"].shape[0])
    return attack(
      params,
      model_state,
      batch["image"],
      batch["label"],
      key,
      loss="ce",
      step=step,
      eps=eps,
      step_size=step_size,
    )

  def loss(params, model_state, aux_state, batch, adv, key, step):
    del step
    y = batch["label"]
    out = base.forward(
      model,
      params,
      model_state,
      adv,
      mode="train",
      labels=y,
      taps=base.ALL_TAPS,
      rng=base.pass_key(key, 0),
    )
    value = base.cross_entropy_mean(out.logits, y)
    metrics = {
      "adv_accuracy": base.accuracy(out.logits, y),
      "w0_mean": jnp.mean(w0_per_example(out)),
    }
    return value, base.LossAux(out.model_state, aux_state, metrics, {"adv": out})

  return base.Objective(
    "afa_stage2",
    base.no_aux_state,
    generate,
    loss,
    base.BNPolicy(attack=attack.bn, update="weight generators only (branches frozen)"),
    adaptive_losses(ratios),
    analysis=_fusion_analysis,
  )


def _fusion_analysis(model, variables):
  """W1 against eps (paper Fig. 6), for ``launch.evaluate --preset=ladder``."""
  return _afa_analysis.analysis(model, variables)


def objective(model, config) -> base.Objective:
  """The standalone ``afa_stage2`` objective of the config grammar (the defense contract)."""
  return afa_stage2(model, config)
