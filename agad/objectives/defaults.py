"""How an objective or defense reads its hyper-parameters, and its training attack.

Every objective/defense module defines ``DEFAULTS`` (its ``config.objective.<name>``
fields, each commented with the official value and its source).
``objective_config(config, name, DEFAULTS)`` merges the user's ``config.objective.<name>``
(when present) over them; unknown keys fail with the list of known ones. The training
attack itself (eps, step_size, steps, norm, random_start, bn, driver) lives in
``config.attack``; an objective only overrides the fields its official code fixes
(e.g. TRADES' 0.001 N(0, 1) start and eval-mode BN). ``None`` in an override field means
"use ``config.attack``". The training PGD of an objective, ``TrainingAttack``, is in
:mod:`agad.objectives.training_attack` (also importable from here).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from agad.objectives.training_attack import TrainingAttack, attack_setting  # noqa: F401  (its old home)


def _as_dict(tree: Any) -> dict:
  if tree is None:
    return {}
  if isinstance(tree, ml_collections.ConfigDict):
    return tree.to_dict()
  return dict(tree)


def objective_config(config: Any, name: str, defaults: Any) -> ml_collections.ConfigDict:
  """``config.objective.<name>`` merged over ``defaults`` (the module's ``DEFAULTS``).

  Unknown keys in the user's sub-dict are an error (they are usually typos).
  """
  merged = _as_dict(defaults)
  objective_cfg = getattr(config, "objective", None) if config is not None else None
  user = _as_dict(getattr(objective_cfg, name, None) if objective_cfg is not None else None)
  unknown = sorted(set(user) - set(merged))
  if unknown:
    raise KeyError(f"config.objective.{name} has unknown fields {unknown}; known: {sorted(merged)}")
  merged.update(user)
  return ml_collections.ConfigDict(merged)


def bn_pass_order(spec: str) -> tuple[str, ...]:
  """``"clean,adv,clean"`` -> ``("clean", "adv", "clean")``, validated."""
  order = tuple(s.strip() for s in spec.split(",") if s.strip())
  if not order or set(order) - {"clean", "adv"} or "clean" not in order or "adv" not in order:
    raise ValueError(
      f"bn_updates {spec!r} must list 'clean' and 'adv' passes, e.g. 'clean,adv,clean'"
    )
  return order
