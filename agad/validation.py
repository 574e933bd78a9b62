"""Rules for config values: what a field accepts, and one-line messages that say so.

A :class:`Rule` is ``ok(value) -> bool`` plus the text of what is accepted; :func:`need`
raises ``ValueError("config.FIELD=VALUE is invalid: ACCEPTED")``. Shared by the training
config's checks (``agad.training.builders.check_config``) and the defenses' field checks
(``agad.defenses._validate``); imports nothing from agad.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import ml_collections


class Rule(NamedTuple):
  """``ok(value) -> bool`` and the text that says what is accepted."""

  ok: Callable[[Any], bool]
  accepted: str


def is_int(v) -> bool:
  """An integer, not a bool (``True`` is not a step count)."""
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v) -> bool:
  """A finite real number, not a bool or a string."""
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def is_seq(v) -> bool:
  return isinstance(v, (tuple, list))


def _fmt(x) -> str:
  return f"{x:g}" if isinstance(x, float) else str(x)


def int_rule(lo: int = 0, hi: int | None = None, what: str = "") -> Rule:
  text = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
  return Rule(lambda v: is_int(v) and v >= lo and (hi is None or v <= hi), text + what)


def num_rule(lo=None, hi=None, *, lo_open=False, hi_open=False, what: str = "") -> Rule:
  """A finite real number (not a bool) in the interval."""

  def ok(v):
    if not is_real(v):
      return False
    v = float(v)
    return (lo is None or (v > lo if lo_open else v >= lo)) and (
      hi is None or (v < hi if hi_open else v <= hi)
    )

  if lo is not None and hi is not None:
    text = f"a number in {'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"
  elif lo is not None:
    text = f"a finite number {'>' if lo_open else '>='} {_fmt(lo)}"
  elif hi is not None:
    text = f"a finite number {'<' if hi_open else '<='} {_fmt(hi)}"
  else:
    text = "a finite number"
  return Rule(ok, text + what)


def choice_rule(options, what: str = "") -> Rule:
  options = tuple(options)
  return Rule(
    lambda v: isinstance(v, str) and v in options,
    " | ".join(repr(o) if o == "" else str(o) for o in options) + what,
  )


def optional(rule: Rule, none_means: str = "") -> Rule:
  return Rule(
    lambda v: v is None or rule.ok(v),
    f"None{f' ({none_means})' if none_means else ''} or {rule.accepted}",
  )


def _regexes_ok(v) -> bool:
  if not isinstance(v, str):
    return False
  try:
    for p in filter(None, v.split(",")):
      re.compile(p)
  except re.error:
    return False
  return True


def _step_ok(v) -> bool:
  return (is_int(v) and v >= 0) or (isinstance(v, str) and (v in ("latest", "best") or v.isdigit()))


POSITIVE = num_rule(0, lo_open=True)
NON_NEGATIVE = num_rule(0)
BOOL = Rule(lambda v: isinstance(v, bool), "True | False")
STR = Rule(lambda v: isinstance(v, str), "a string")
SEED = int_rule(0, what=" (a seed)")
STEP = Rule(_step_ok, "latest | best | a step number >= 0")
REGEXES = Rule(_regexes_ok, "comma-separated regular expressions that compile ('' = none)")


def type_rule(default: Any) -> Rule:
  """The rule of a field known only by its default value: the same type."""
  if isinstance(default, bool):
    return BOOL
  if is_int(default):
    return Rule(is_int, "an integer")
  if isinstance(default, float):
    return num_rule()
  if isinstance(default, str):
    return STR
  if is_seq(default):
    return Rule(is_seq, "a tuple")
  return Rule(lambda v: True, "anything")


def need(ok: bool, field: str, value: Any, accepted: str) -> None:
  """``ValueError("config.FIELD=VALUE is invalid: ACCEPTED")`` unless ``ok``."""
  if not ok:
    if isinstance(value, ml_collections.ConfigDict):  # one line, not its YAML repr
      value = value.to_dict()
    raise ValueError(f"config.{field}={value!r} is invalid: {accepted}")


def check(rule: Rule, field: str, value: Any) -> None:
  need(rule.ok(value), field, value, rule.accepted)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
  """Leaves of a ConfigDict / dict by dotted path (sub-dicts recursed)."""
  out = {}
  for key, value in node.items() if hasattr(node, "items") else ():
    path = f"{prefix}{key}"
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      out.update(flatten(value, path + "."))
    else:
      out[path] = value
  return out


def fields_of(rules: Mapping[str, Any], parent: str) -> str:
  """The field names directly under ``parent`` ('' = the top) among ``rules``' paths."""
  depth = parent.count(".") + 1 if parent else 0
  names = sorted({k.split(".")[depth] for k in rules if not parent or k.startswith(parent + ".")})
  return ", ".join(names)


def unknown_field(rules: Mapping[str, Any], path: str, value: Any, root: str = "config") -> None:
  """Refuses ``path`` (not in ``rules``), listing the fields of its deepest known parent."""
  parts = path.split(".")
  parent = ""
  for i in range(len(parts) - 1, 0, -1):
    candidate = ".".join(parts[:i])
    if any(k.startswith(candidate + ".") for k in rules):
      parent = candidate
      break
  where = f"{root}.{parent}" if parent else root
  field = f"{root[len('config.') :]}.{path}" if root != "config" else path
  need(
    False, field, value, f"no such field; fields of {where}: {fields_of(rules, parent) or '(none)'}"
  )
