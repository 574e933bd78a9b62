"""Objectives and transforms by name, for configs (``"trades+awp+fsr"``).

A base objective factory is ``(model, config) -> Objective``; a transform factory is
``(objective, model, config) -> Objective``. ``build_objective("a+t1+t2")`` returns
``t2(t1(a))``: transforms apply left to right, innermost first.
"""

from __future__ import annotations

from typing import Callable

from agad.objectives import base

OBJECTIVES: dict[str, Callable] = {}
TRANSFORMS: dict[str, Callable] = {}


def register_objective(name: str):
  def wrap(factory):
    OBJECTIVES[name] = factory
    return factory
  return wrap


def register_transform(name: str):
  def wrap(factory):
    TRANSFORMS[name] = factory
    return factory
  return wrap


def parse(spec: str) -> tuple[str, list[str]]:
  """``"trades+awp"`` -> ``("trades", ["awp"])`` with helpful errors for unknown names."""
  names = [s.strip() for s in spec.split("+") if s.strip()]
  if not names:
    raise ValueError(f"empty objective spec {spec!r}; expected e.g. 'pgd_at' or 'trades+awp'")
  head, transforms = names[0], names[1:]
  if head not in OBJECTIVES:
    raise ValueError(f"unknown objective {head!r} in {spec!r}; known: {sorted(OBJECTIVES)}"
                     + (f" ({head!r} is a transform: put it after a base objective)" if head in TRANSFORMS else ""))
  for t in transforms:
    if t not in TRANSFORMS:
      raise ValueError(f"unknown transform {t!r} in {spec!r}; known: {sorted(TRANSFORMS)}")
  return head, transforms


def build_objective(spec: str, model, config) -> base.Objective:
  head, transforms = parse(spec)
  objective = OBJECTIVES[head](model, config)
  for t in transforms:
    objective = TRANSFORMS[t](objective, model, config)
  return objective


# Built-in registrations (later objectives register themselves on import).
from agad.objectives import standard as _standard  # noqa: E402

register_objective("standard")(lambda model, config: _standard.standard(model))
register_objective("pgd_at")(lambda model, config: _standard.pgd_at(model, config))
