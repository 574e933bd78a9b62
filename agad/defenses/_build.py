"""A run's model and weights, below everything that loads one: the backbone a config asks
for (with the plug-ins and norm layers of its defenses), a workdir's saved config, and a
checkpoint's weights for that backbone. Training, ``agad.load`` (:mod:`agad.api`) and the
frozen teachers of distillation defenses (:mod:`agad.defenses._teacher`) all use these, so
no defense needs the public API above it.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from agad import checkpoint as ckpt_lib
from agad import data as data_lib
from agad import models as models_lib
from agad.defenses._registry import norm_for, norm_hook_for, plugins_for, use_recorded

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
  model_cfg = config.model
  if model_cfg.dtype not in DTYPES:
    raise ValueError(f"model.dtype {model_cfg.dtype!r} is not one of {sorted(DTYPES)}")
  spec = config.objective.name
  mean = model_cfg.get("mean") or info.mean
  std = model_cfg.get("std") or info.std
  kwargs = dict(
    num_classes=info.num_classes,
    mean=mean,
    std=std,
    dtype=DTYPES[model_cfg.dtype],
    norm=norm_for(spec, config),
  )
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


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(os.path.abspath(workdir), "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir} is not an agad training workdir")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  use_recorded_defenses(workdir)
  return config


def use_recorded_defenses(workdir: str) -> list[str]:
  """Puts the out-of-tree defense folders the run record of ``workdir`` names back on the
  path (``agad.defenses.use_recorded``): evaluating a run trained with ``AGAD_DEFENSES_PATH``
  needs no variable. Returns the folders added."""
  record = os.path.join(os.path.abspath(workdir), "run_record.json")
  if not os.path.exists(record):
    return []
  try:
    with open(record) as f:
      launches = json.load(f).get("launches", [])
  except (OSError, ValueError):
    return []
  recorded = {}
  for launch in launches:  # the newest launch's entry wins
    recorded.update(launch.get("defenses") or {})
  return use_recorded(recorded)


class Restored(NamedTuple):
  config: ml_collections.ConfigDict
  info: Any  # the dataset's DatasetInfo (classes, shape, normalisation)
  model: Any
  variables: dict  # {'params': ..., 'batch_stats': ...} ready for model.apply
  step: int


def restore(workdir: str, step: Any = "best", *, params: str = "params", config=None) -> Restored:
  """The model of ``workdir``'s config (or ``config``) with the weights of checkpoint ``step``
  (``"best"``, ``"latest"`` or a number); ``params``: ``"params"`` or ``"ema"``."""
  if params not in ("params", "ema"):
    raise ValueError(f"params={params!r}; use 'params' or 'ema'")
  config = config or load_config(workdir)
  info = data_lib.dataset_info(config.data)
  model = build_model(config, info)
  raw, step = ckpt_lib.read_state(workdir, step)
  if params == "ema":
    if not raw.get("ema_params"):
      raise ValueError(f"{workdir} kept no EMA weights (ema_decay was 0); use params='params'")
    weights = raw["ema_params"]
  else:
    weights = raw["params"]
  variables = jax.tree.map(jnp.asarray, {"params": weights, **(raw.get("model_state") or {})})
  return Restored(config, info, model, variables, step)
