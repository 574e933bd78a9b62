"""Defenses: one module per paper defense, found by name (see ``_registry``).

``agad/defenses/<name>.py`` defines ``DEFAULTS``, ``objective(model, config)`` and/or
``transform(inner, model, config)``, and optionally ``plugins(config, num_classes)`` and
``norm(config)``; nothing else in the repository lists it. ``build_model(config, info)``
builds a run's backbone with the plug-ins and norm layers its objective spec asks for
(what training, ``agad.load`` and frozen teachers all use).

Out-of-tree defenses: folders in the ``AGAD_DEFENSES_PATH`` environment variable
(``os.pathsep``-separated) are added to this package's path, so
``--config=...:smallcnn,my_defense`` finds ``my_defense.py`` there. Training records
each module's file and SHA-256 in the run record (``sources``); ``agad.load`` and the
launch commands put a recorded out-of-tree folder back on the path (``use_recorded``).
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp

__path__.extend(p for p in os.environ.get("AGAD_DEFENSES_PATH", "").split(os.pathsep)
                if p and p not in __path__)

from agad.defenses._registry import (add_defaults, build_objective, defaults, find,  # noqa: E402
                                     names, norm_for, norm_hook_for, parse, plugins_for, sources,
                                     spec_names, use_recorded, with_plugin_overrides)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
INPUT_NORMS = ("dataset", "per_image", "none")


def build_model(config: Any, info: Any):
  """The backbone of ``config.model`` with the plug-ins and norm its objective asks for.

  ``info``: the dataset's ``DatasetInfo`` (num_classes, mean, std, image_shape).
  ``config.model.mean`` / ``std`` (when set) replace the dataset's normalisation
  constants and ``config.model.input_norm`` picks ``dataset | per_image | none``.
  Plug-in sites are resolved against the model (``stage3.unit[-1]`` aliases) and a site
  the model does not have is an error listing the ones it has.
  """
  from agad import models as models_lib
  model_cfg = config.model
  if model_cfg.dtype not in DTYPES:
    raise ValueError(f"model.dtype {model_cfg.dtype!r} is not one of {sorted(DTYPES)}")
  spec = config.objective.name
  mean = model_cfg.get("mean") or info.mean
  std = model_cfg.get("std") or info.std
  kwargs = dict(num_classes=info.num_classes, mean=mean, std=std, dtype=DTYPES[model_cfg.dtype],
                norm=norm_for(spec, config))
  hook = norm_hook_for(spec, config)
  if hook is not None:
    kwargs["norm_hook"] = hook
  input_norm = model_cfg.get("input_norm", "dataset") or "dataset"
  if input_norm not in INPUT_NORMS:
    raise ValueError(f"model.input_norm {input_norm!r} is not one of {INPUT_NORMS}")
  if input_norm != "dataset":
    kwargs["input_norm"] = input_norm
  model = models_lib.build_model(model_cfg.name, **kwargs)
  plugins = plugins_for(spec, config, info.num_classes)
  if plugins:
    plugins = models_lib.resolve_plugins(model, plugins, tuple(info.image_shape))
    model = model.clone(plugins=plugins)
  return model
