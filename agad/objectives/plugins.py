"""Model plug-ins requested by objectives and defenses, resolved before the model is built.

The model is built before the objective, so an objective that needs modules inside the
network (CAS heads and masks, later FSR/AGAIN) registers a *plug-in builder*
``(config, num_classes) -> {site_name: zero-arg factory returning a linen module}``
under its spec name. The trainer asks for the union of the spec's plug-ins:

    plugins = plugins_for("cas+awp", config, num_classes)   # {'features': <factory>}
    model = build_model(name, num_classes=..., mean=..., std=..., plugins=plugins)
    objective = build_objective("cas+awp", model, config)

Names without plug-ins contribute nothing. Two plug-ins on the same site are an error.
This module depends on nothing else in ``agad.objectives`` (no import cycles); builders
are registered by the modules that define them (``agad.objectives.cas``), so import
``agad.objectives`` (or the defining module) before calling ``plugins_for``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

PluginBuilder = Callable[[Any, int], dict]
PLUGIN_BUILDERS: dict[str, PluginBuilder] = {}


def register_plugins(name: str):
  """Decorator: ``builder(config, num_classes) -> {site: factory}`` for spec name ``name``."""

  def wrap(builder: PluginBuilder) -> PluginBuilder:
    PLUGIN_BUILDERS[name] = builder
    return builder

  return wrap


def spec_names(spec: str | Iterable[str]) -> list[str]:
  """``"trades+awp+cas"`` (or a list of names) -> ``["trades", "awp", "cas"]``."""
  if isinstance(spec, str):
    return [s.strip() for s in spec.split("+") if s.strip()]
  return [str(s).strip() for s in spec if str(s).strip()]


def plugins_for(spec: str | Iterable[str], config: Any, num_classes: int) -> dict:
  """The ``{site: factory}`` plug-ins every name in ``spec`` asks for (merged)."""
  merged: dict = {}
  owner: dict = {}
  for name in spec_names(spec):
    builder = PLUGIN_BUILDERS.get(name)
    if builder is None:
      continue
    for site, factory in dict(builder(config, num_classes)).items():
      if site in merged:
        raise ValueError(f"plug-in site {site!r} is requested by both {owner[site]!r} and {name!r} "
                         f"in {spec!r}; move one of them to another site in its config")
      merged[site], owner[site] = factory, name
  return merged
