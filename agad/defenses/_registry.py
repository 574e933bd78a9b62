"""Objectives and defenses by name: modules found on demand, as big_vision finds models.

A name in the config grammar (``MODEL,OBJECTIVE[+TRANSFORM...]``) is a module:
``agad.defenses.<name>`` first, then ``agad.objectives.<name>`` (the base objectives).
No list to edit, no registration side effect: a module qualifies when it defines

* ``DEFAULTS`` — an ``ml_collections.ConfigDict`` of its ``config.objective.<name>``
  fields (optional; empty when absent);
* ``objective(model, config) -> Objective`` (a standalone objective, the head of a
  spec) and/or ``transform(inner, model, config) -> Objective`` (a name after ``+``);
* optionally ``recipe(config, *, dataset, model, spec, smoke)``: its papers' / official
  codes' training recipes (epochs, schedule, input scaling, ...), applied by ``configs/``
  to a ``config`` of ``dataset`` (``config.data.name``) before ``smoke`` shrinks it;
* optionally ``plugins(config, num_classes) -> {site: factory}`` (modules it puts inside
  the network), ``norm(config) -> factory`` (the backbone's norm layer, e.g. AFA's
  multi-branch BN) and ``norm_hook(config) -> factory | None`` (a module run once per
  stage that hands that stage's norm layers their ``norm_ctx``, e.g. AFA's per-stage
  weight generator).

``"a+t1+t2"`` builds ``t2(t1(a))``: transforms apply left to right, innermost first.
Extra folders on ``agad.defenses``' package path (the ``AGAD_DEFENSES_PATH`` environment
variable, ``os.pathsep``-separated) hold out-of-tree defenses. ``sources(spec)`` names the
file (and its SHA-256) each name was loaded from: training records it in the run record,
and ``use_recorded`` puts a recorded out-of-tree folder back on the path when a later
command (evaluate, attention) runs without the variable.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import os
import pkgutil
import re
from typing import Any, Iterable

import ml_collections
from absl import logging

PACKAGES = ("agad.defenses", "agad.objectives")
_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_IN_TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the agad package
_RECORDED: dict[str, str] = {}  # name -> the file a run recorded (see use_recorded)


def _import(package: str, name: str):
  full = f"{package}.{name}"
  try:
    return importlib.import_module(full)
  except ModuleNotFoundError as e:
    if e.name == full:
      return None
    raise


def _is_component(module) -> bool:
  return module is not None and (
    callable(getattr(module, "objective", None)) or callable(getattr(module, "transform", None))
  )


def names() -> dict[str, list[str]]:
  """``{"objectives": [...], "transforms": [...]}``: every module name that qualifies."""
  found = {"objectives": set(), "transforms": set()}
  for package in PACKAGES:
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
      if info.name.startswith("_") or not _NAME.fullmatch(info.name):
        continue
      try:
        module = _import(package, info.name)
      except Exception:  # A broken module is reported when it is asked for by name.
        continue
      if callable(getattr(module, "objective", None)):
        found["objectives"].add(info.name)
      if callable(getattr(module, "transform", None)):
        found["transforms"].add(info.name)
  return {k: sorted(v) for k, v in found.items()}


def _known() -> str:
  n = names()
  return f"objectives: {', '.join(n['objectives'])}; transforms: {', '.join(n['transforms'])}"


def _unknown(name: str) -> str:
  """The message for a name no package has: the closest known names, the known ones, and
  where an out-of-tree defense must be (the folder a run recorded, when there is one)."""
  n = names()
  close = difflib.get_close_matches(
    str(name), sorted(set(n["objectives"]) | set(n["transforms"])), n=2
  )
  hint = f" (did you mean {' or '.join(close)}?)" if close else ""
  recorded = _RECORDED.get(name)
  where = (
    f"; the run was trained with {name} from {recorded}, which is gone: put the folder that "
    f"now holds {name}.py in AGAD_DEFENSES_PATH"
    if recorded
    else f"; a defense outside agad/defenses: put the folder holding {name}.py in AGAD_DEFENSES_PATH"
  )
  return f"unknown objective or defense {name!r}{hint}; known {_known()}{where}"


def find(name: str):
  """The module of objective/defense ``name`` (``agad.defenses`` first)."""
  if not _NAME.fullmatch(name or ""):
    raise ValueError(f"{name!r} is not a valid objective or defense name; known {_known()}")
  for package in PACKAGES:
    module = _import(package, name)
    if _is_component(module):
      return module
  raise ValueError(_unknown(name))


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def sources(spec: str | Iterable[str]) -> dict[str, dict]:
  """``{name: {"file", "sha256", "out_of_tree"}}`` for every name of ``spec``: the module
  file each was loaded from (what the run record keeps, so a later command finds an
  out-of-tree defense without ``AGAD_DEFENSES_PATH``)."""
  out = {}
  for name in spec_names(spec):
    path = os.path.abspath(find(name).__file__)
    out[name] = {
      "file": path,
      "sha256": _sha256(path),
      "out_of_tree": os.path.commonpath([path, _IN_TREE]) != _IN_TREE,
    }
  return out


def use_recorded(recorded: dict) -> list[str]:
  """Puts the folder of every recorded out-of-tree module (``sources``' output) that is
  not found now back on ``agad.defenses``' path; returns the folders added. A module whose
  source changed since it was recorded is used with a warning naming both hashes."""
  import agad.defenses as package  # the package imports this module: its path, at call time

  added = []
  for name, info in (recorded or {}).items():
    if not isinstance(info, dict) or not info.get("out_of_tree") or not _NAME.fullmatch(str(name)):
      continue
    path = str(info.get("file", ""))
    _RECORDED[name] = path
    if not any(_is_component(_import(p, name)) for p in PACKAGES):
      folder = os.path.dirname(path)
      if not os.path.isfile(path):
        continue  # find() names the recorded file and the variable
      if folder not in package.__path__:
        package.__path__.append(folder)
        added.append(folder)
      logging.info("defense %s: the run record's %s (AGAD_DEFENSES_PATH is not needed)", name, path)
    found = os.path.abspath(find(name).__file__)
    if info.get("sha256") and os.path.isfile(found) and _sha256(found) != info["sha256"]:
      logging.warning(
        "defense %s: %s changed since the run was trained (sha256 %s... then, %s... now)",
        name,
        found,
        str(info["sha256"])[:12],
        _sha256(found)[:12],
      )
  return added


def spec_names(spec: str | Iterable[str]) -> list[str]:
  """``"trades+awp+cas"`` (or a list of names) -> ``["trades", "awp", "cas"]``."""
  if isinstance(spec, str):
    return [s.strip() for s in spec.split("+") if s.strip()]
  return [str(s).strip() for s in spec if str(s).strip()]


def parse(spec: str) -> tuple[str, list[str]]:
  """``"trades+awp"`` -> ``("trades", ["awp"])``; unknown names fail with the known ones."""
  parts = spec_names(spec)
  if not parts:
    raise ValueError(f"empty objective spec {spec!r}; expected e.g. 'pgd_at' or 'trades+awp'")
  head, transforms = parts[0], parts[1:]
  if not callable(getattr(find(head), "objective", None)):
    raise ValueError(
      f"{head!r} in {spec!r} is a transform, not an objective: put it after a "
      f"base objective (e.g. 'pgd_at+{head}'); known {_known()}"
    )
  for t in transforms:
    if not callable(getattr(find(t), "transform", None)):
      raise ValueError(
        f"{t!r} in {spec!r} cannot follow '+' (it has no transform); known {_known()}"
      )
  return head, transforms


def defaults(name: str) -> ml_collections.ConfigDict:
  """A fresh copy of module ``name``'s ``DEFAULTS`` (empty when it has none)."""
  d = getattr(find(name), "DEFAULTS", None)
  return ml_collections.ConfigDict(d.to_dict() if d is not None else {})


def add_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds ``config.objective.<name>`` = ``DEFAULTS`` for every name of the config's spec
  that is missing (so ``--config.objective.<name>.<field>=...`` overrides work)."""
  for name in spec_names(config.objective.name):
    if name not in config.objective:
      config.objective[name] = defaults(name)
  return config


def build_objective(spec: str, model, config):
  """``t2(t1(a))`` for ``"a+t1+t2"``."""
  head, transforms = parse(spec)
  objective = find(head).objective(model, config)
  for t in transforms:
    objective = find(t).transform(objective, model, config)
  return objective


def apply_recipes(config: Any, *, dataset: str, model: str, spec: str, smoke: bool) -> None:
  """Applies the paper/code recipe of every name of ``spec`` that has one: the module's
  ``recipe(config, dataset=, model=, spec=, smoke=)`` edits ``config`` in place when it has a
  recipe for that dataset, model and spec (and returns without a change otherwise)."""
  for name in spec_names(spec):
    recipe = getattr(find(name), "recipe", None)
    if recipe is not None:
      recipe(config, dataset=dataset, model=model, spec=spec, smoke=smoke)


def plugins_for(spec: str | Iterable[str], config: Any, num_classes: int) -> dict:
  """The ``{site: factory}`` plug-ins every name in ``spec`` asks for (merged).

  Two names asking for the same site is an error (move one in its config).
  """
  merged, owner = {}, {}
  for name in spec_names(spec):
    builder = getattr(find(name), "plugins", None)
    if builder is None:
      continue
    for site, factory in dict(builder(config, num_classes)).items():
      if site in merged:
        raise ValueError(
          f"plug-in site {site!r} is requested by both {owner[site]!r} and {name!r} "
          f"in {spec!r}; move one of them to another site in its config"
        )
      merged[site], owner[site] = factory, name
  return merged


def _one_builder(spec, config: Any, attr: str, what: str):
  """``module.<attr>(config)`` of the one name of ``spec`` that defines it (None if none)."""
  chosen, owner = None, None
  for name in spec_names(spec):
    builder = getattr(find(name), attr, None)
    if builder is None:
      continue
    if owner is not None:
      raise ValueError(f"both {owner!r} and {name!r} in {spec!r} replace {what}")
    chosen, owner = builder(config), name
  return chosen


def norm_for(spec: str | Iterable[str], config: Any):
  """The norm factory a name of ``spec`` asks for (``None``: the backbone's BatchNorm)."""
  return _one_builder(spec, config, "norm", "the model's norm layers")


def norm_hook_for(spec: str | Iterable[str], config: Any):
  """The backbone's per-group ``norm_ctx`` hook a name of ``spec`` asks for (``None``: none;
  see :class:`agad.models.layers.Backbone`)."""
  return _one_builder(spec, config, "norm_hook", "the model's norm hook")


def with_plugin_overrides(net, **overrides):
  """``net`` with every plug-in whose class lists the keys in ``ADAPTIVE_FIELDS`` rebuilt
  with ``overrides`` (same parameters): attack-time settings for adaptive attacks
  (straight-through masks, a softer temperature). No matching plug-in is an error."""
  plugins = dict(net.plugins or {})
  found = False
  for site, factory in plugins.items():
    if not isinstance(factory, functools.partial):
      continue
    allowed = getattr(factory.func, "ADAPTIVE_FIELDS", ())
    if set(overrides) <= set(allowed):
      plugins[site] = functools.partial(
        factory.func, *factory.args, **{**factory.keywords, **overrides}
      )
      found = True
  if not found:
    raise ValueError(
      f"no plug-in of this model accepts the attack-time overrides {sorted(overrides)} "
      f"(plug-ins: { {s: getattr(f, 'func', f) for s, f in (net.plugins or {}).items()} }); "
      "a plug-in class lists them in ADAPTIVE_FIELDS"
    )
  return net.clone(plugins=plugins)
