"""Defaults of a run's ``config.eval`` (what ``launch.evaluate`` runs on the test split).

They live here, not in ``configs/``, so that evaluation never imports the configs: a
workdir saved before a field existed still evaluates with the default beneath its saved
values (``checkpoint_eval.evaluate``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import ml_collections

from agad.evaluation.presets import PRESETS


def eval_defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.batch_size = 500  # Eval batch.
  c.pgd_steps = 20  # PGD-k on the test set.
  c.step_size = 2 / 255  # PGD step size.
  c.eps = 8 / 255  # Evaluation radius.
  c.restarts = 1  # PGD restarts (per-example worst case).
  c.num_examples = ml_collections.FieldReference(
    None, field_type=int
  )  # First N test images (None = all).
  c.params = "auto"  # auto (the weights validation selected on: ema when the run kept and
  # validated an EMA, else params) | params | ema.
  c.preset = "pgd"  # pgd (clean + PGD-k) | table | table_aa | full | autoattack | ladder.
  c.ladder = (0.125, 0.25, 0.5, 1.0)  # ladder preset: PGD-k at these factors of eps (AFA's
  # {1, 2, 4, 8}/255 at 8/255); increasing, in (0, 1], last 1.
  c.aa_version = "standard"  # AutoAttack version: standard | plus | rand.
  c.cw_kappa = 50.0  # C&W-inf: margin clipped at kappa (the papers' "C&W").
  c.cw_steps = 30  # C&W-inf: PGD steps on the margin.
  c.cw_step_size = 2 / 255  # C&W-inf: step size.
  c.cache = True  # Cache per-example results under WORKDIR/eval/cache.
  c.seed = 0  # Attack randomness.
  return c


def merged_eval_config(saved: Any = None, override: Any = None) -> ml_collections.ConfigDict:
  """The defaults, then a run's saved ``eval`` fields, then ``override`` (the CLI's
  ``--config.eval.*`` or a library caller's dict), validated.

  Unknown keys are an error naming them and the known ones (a typo must not be ignored);
  FieldReferences of a freshly built config are read as plain values.
  """
  cfg = eval_defaults()
  known = sorted(cfg.keys())
  for source, what in ((saved, "the saved config's eval"), (override, "eval_config")):
    if source is None:
      continue
    values = source.to_dict() if isinstance(source, ml_collections.ConfigDict) else dict(source)
    unknown = sorted(set(values) - set(known))
    if unknown and what == "eval_config":
      raise KeyError(f"{what} has unknown fields {unknown}; known: {known}")
    for k, v in values.items():
      if k in known:
        try:
          cfg[k] = v
        except TypeError:  # ConfigDict's type check: say what the field takes
          raise TypeError(f"config.eval.{k}={v!r} is invalid: {eval_rules()[k][1]}") from None
  validate_eval_config(cfg)
  return cfg


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _ladder_ok(v) -> bool:
  if not isinstance(v, (tuple, list)) or not v or not all(_is_real(f) for f in v):
    return False
  ladder = [float(f) for f in v]
  return all(0 < f <= 1 for f in ladder) and ladder == sorted(set(ladder)) and ladder[-1] == 1.0


def eval_rules() -> dict:
  """``{field: (ok(value) -> bool, accepted)}`` for every field of :func:`eval_defaults`."""
  positive_int = (lambda v: _is_int(v) and v >= 1, "an integer >= 1")
  step = (lambda v: _is_real(v) and v > 0, "a step size > 0 (pixel units)")
  return {
    "batch_size": positive_int,
    "pgd_steps": positive_int,
    "step_size": step,
    "eps": (
      lambda v: _is_real(v) and 0 <= v <= 1,
      "a radius in [0, 1] pixel units (e.g. 8/255 or 0.1)",
    ),
    "restarts": positive_int,
    "num_examples": (
      lambda v: v is None or (_is_int(v) and v >= 1),
      "None (all) or an integer >= 1",
    ),
    "params": (lambda v: v in ("auto", "params", "ema"), "auto | params | ema"),
    "preset": (lambda v: isinstance(v, str) and v in PRESETS, " | ".join(PRESETS)),
    "ladder": (
      _ladder_ok,
      "increasing factors of eval.eps in (0, 1] ending at 1, e.g. (0.125, 0.25, 0.5, 1.0)",
    ),
    "aa_version": (lambda v: v in ("standard", "plus", "rand"), "standard | plus | rand"),
    "cw_kappa": (lambda v: _is_real(v) and v >= 0, "a finite number >= 0 (the C&W margin)"),
    "cw_steps": positive_int,
    "cw_step_size": step,
    "cache": (lambda v: isinstance(v, bool), "True | False"),
    "seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (a seed)"),
  }


def validate_eval_config(cfg) -> None:
  """Every field of a run's ``eval`` config: known (a typo must not be ignored), its type
  and range. Messages name the field, the value and what is accepted:
  ``config.eval.FIELD=VALUE is invalid: ACCEPTED``."""
  rules = eval_rules()
  for field in cfg.keys():
    if field not in rules:
      raise ValueError(
        f"config.eval.{field}={cfg[field]!r} is invalid: no such field; fields of "
        f"config.eval: {', '.join(sorted(rules))}"
      )
    ok, accepted = rules[field]
    if not ok(cfg[field]):
      raise ValueError(f"config.eval.{field}={cfg[field]!r} is invalid: {accepted}")


def selected_weights(config) -> str:
  """``"ema"`` or ``"params"``: the weights a run's validation chose "best" on."""
  use_ema = bool(config.get("validation", {}).get("use_ema", True))
  return "ema" if use_ema and float(config.get("ema_decay", 0.0) or 0.0) > 0 else "params"


def weights_to_evaluate(eval_cfg, config) -> tuple[str, str]:
  """``(weights, note)`` for ``eval.params`` (``auto`` evaluates what validation selected)."""
  selected = selected_weights(config)
  choice = eval_cfg.params
  if choice == "auto":
    return selected, f"{selected} (the weights validation selected the checkpoint on)"
  if choice not in ("params", "ema"):
    raise ValueError(f"eval.params={choice!r} is not one of auto | params | ema")
  if choice != selected:
    return choice, (
      f"{choice}, but the checkpoint was selected on the {selected} weights' validation "
      "accuracy: 'best' may not be best for these weights"
    )
  return choice, f"{choice} (the weights validation selected the checkpoint on)"
