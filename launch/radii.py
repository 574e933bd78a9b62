"""Radii on the command line: fractions for float ``--config.*`` fields (``8/255``) and
``--config.eps``, the one radius that training, validation and evaluation follow unless
one of them is given too. Imported by ``launch.common`` (every launcher)."""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags


class _FractionParser(flags.FloatParser):
  """A float flag that also takes a fraction: ``8/255``, ``2/255``, ``0.5/4``."""

  def convert(self, argument):
    if isinstance(argument, str) and argument.count("/") == 1:
      num, den = argument.split("/")
      try:
        value = float(num) / float(den)
      except (ValueError, ZeroDivisionError):
        raise ValueError(
          f"could not read {argument!r} as a number or a fraction like 8/255"
        ) from None
      return value
    return super().convert(argument)


# Every float --config.* field (radii, step sizes, ...) takes a fraction like 8/255.
config_flags.register_flag_parser_for_type(float, _FractionParser())


RADII = ("attack.eps", "validation.attack.eps", "eval.eps")


def explicit_overrides(name: str = "config", flag_values=None) -> set[str]:
  """The ``--config.<field>`` overrides given on the command line (dotted, without ``config.``)."""
  fv = flag_values if flag_values is not None else flags.FLAGS
  prefix = name + "."
  return {n[len(prefix) :] for n in fv if n.startswith(prefix) and fv[n].present}


def _get(config, path: str):
  for part in path.split("."):
    config = config[part]
  return config


def resolve_radii(config, explicit=(), fields=RADII) -> dict:
  """``config.eps`` (when set) copied into each of ``fields`` not in ``explicit`` (the
  overrides given on the command line); returns ``{field: radius}`` as resolved."""
  one = config.get("eps")
  for path in fields:
    if one is not None and path not in explicit:
      parent, _, leaf = path.rpartition(".")
      _get(config, parent)[leaf] = float(one)
  return {path: float(_get(config, path)) for path in fields}


def describe_radii(config, radii: dict) -> str:
  """One line: each radius (also in /255 units) with its step size and PGD steps."""
  steps = {
    "attack.eps": ("attack.step_size", "attack.steps"),
    "validation.attack.eps": ("validation.attack.step_size", "validation.attack.steps"),
    "eval.eps": ("eval.step_size", "eval.pgd_steps"),
  }
  parts = []
  for path, eps in radii.items():
    size, count = steps[path]
    parts.append(
      f"{path}={eps:.6g} ({255 * eps:.3g}/255; step {_get(config, size):.4g} x "
      f"{_get(config, count)})"
    )
  return "radii: " + ", ".join(parts)
