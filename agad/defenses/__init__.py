"""Defenses: one module per paper defense, found by name (see ``_registry``).

``agad/defenses/<name>.py`` defines ``DEFAULTS``, ``objective(model, config)`` and/or
``transform(inner, model, config)``, and optionally ``plugins(config, num_classes)``,
``norm(config)`` and ``recipe(config, *, dataset, model, spec, smoke)`` (its paper
recipes, which ``configs/`` applies); nothing else in the repository lists it. ``build_model(config, info)``
builds a run's backbone with the plug-ins and norm layers its objective spec asks for and
``restore(workdir, step)`` reads a run's model and weights (``_build``: what training,
``agad.load`` and frozen teachers all use).

Out-of-tree defenses: folders in the ``AGAD_DEFENSES_PATH`` environment variable
(``os.pathsep``-separated) are added to this package's path, so
``--config=...:smallcnn,my_defense`` finds ``my_defense.py`` there. Training records
each module's file and SHA-256 in the run record (``sources``); ``agad.load`` and the
launch commands put a recorded out-of-tree folder back on the path (``use_recorded``).
"""

from __future__ import annotations

import os

__path__.extend(
  p for p in os.environ.get("AGAD_DEFENSES_PATH", "").split(os.pathsep) if p and p not in __path__
)

from agad.defenses._registry import (
  add_defaults,
  apply_recipes,
  build_objective,
  defaults,
  find,  # noqa: E402
  names,
  norm_for,
  norm_hook_for,
  parse,
  plugins_for,
  sources,
  spec_names,
  use_recorded,
  with_plugin_overrides,
)
from agad.defenses._build import (
  DTYPES,
  INPUT_NORMS,
  Restored,
  build_model,  # noqa: E402,F401
  load_config,
  restore,
  use_recorded_defenses,
)
