"""Config -> data, model, objective, optimizer; ``init_from`` weight transfer."""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from agad import data as data_lib
from agad import models as models_lib
from agad import objectives as objectives_lib
from agad.training import optim

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Experiment(NamedTuple):
  splits: Any
  info: Any
  model: Any
  objective: objectives_lib.Objective


def build_model(config: Any, info: Any):
  """The backbone of ``config.model`` with the plug-ins the objective asks for."""
  if config.model.dtype not in DTYPES:
    raise ValueError(f"model.dtype {config.model.dtype!r} is not one of {sorted(DTYPES)}")
  plugins = objectives_lib.plugins_for(config.objective.name, config, info.num_classes)
  return models_lib.build_model(config.model.name, num_classes=info.num_classes, mean=info.mean,
                                std=info.std, dtype=DTYPES[config.model.dtype],
                                plugins=plugins or None)


def build_experiment(config: Any) -> Experiment:
  splits = data_lib.load_dataset(config.data)
  info = splits.info
  model = build_model(config, info)
  objective = objectives_lib.build_objective(config.objective.name, model, config)
  return Experiment(splits, info, model, objective)


def build_optimizer(config: Any, exp: Experiment, steps_per_epoch: int):
  frozen = [p for p in config.init.freeze.split(",") if p] if config.init.freeze else []
  params = None
  if frozen:
    h, w, c = exp.info.image_shape
    variables = jax.eval_shape(lambda: exp.model.init(jax.random.key(0), jnp.zeros((1, h, w, c)),
                                                      train=False))
    params = variables["params"]
  return optim.make_optimizer(config.optim, steps_per_epoch, config.num_epochs, frozen=frozen,
                              params=params)


def parse_param_map(spec: str) -> list[tuple[str, str]]:
  """``"dst1=src1,dst2=src2"`` ('/'-joined path prefixes) -> pairs; empty = identity."""
  pairs = []
  for item in filter(None, (s.strip() for s in (spec or "").split(","))):
    if "=" not in item:
      raise ValueError(f"init.param_map entry {item!r} must look like 'dst_prefix=src_prefix'")
    dst, src = item.split("=", 1)
    pairs.append((dst.strip(), src.strip()))
  return pairs


def resolve_step(directory: str, step: Any, *, best_metric: str | None = None) -> int:
  """'latest' | 'best' | int -> a saved step number in a checkpoint directory.

  ``best_metric`` (default: read from the run's ``config.json`` next to ``directory``,
  see ``checkpoint.best_metric_for``) picks "best" for checkpoints that predate the
  metric being recorded in their metadata.
  """
  from agad.training import checkpoint as ckpt_lib
  if best_metric is None:
    config_path = os.path.join(os.path.dirname(os.path.abspath(directory)), "config.json")
    best_metric = ckpt_lib.BEST_METRIC
    if os.path.exists(config_path):
      with open(config_path) as f:
        best_metric = ckpt_lib.best_metric_for(json.load(f))
  ckpt = ckpt_lib.Checkpointer(directory, best_metric=best_metric)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoints in {directory}; train first with python -m launch.train")
    if step in (None, "latest"):
      return max(steps)
    if step == "best":
      best = ckpt.best_step()
      if best is None:
        raise ValueError(f"no checkpoint in {directory} has validation metrics; use step='latest'")
      return best
    step = int(step)
    if step not in steps:
      raise ValueError(f"step {step} not saved in {directory}; saved steps: {steps}")
    return step
  finally:
    ckpt.close()


def read_checkpoint_state(workdir: str, step: Any = "latest") -> tuple[dict, int]:
  """The raw saved TrainState of a workdir as nested dicts of numpy arrays."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  step = resolve_step(directory, step)
  path = os.path.join(directory, str(step), "state")
  with ocp.StandardCheckpointer() as checkpointer:
    raw = checkpointer.restore(path)  # no target: nested dicts
  del raw["key"]  # A typed PRNG key; nothing outside the trainer needs it.
  return jax.tree.map(np.asarray, raw), step


def apply_init_from(state, init_cfg: Any):
  """Copies parameters (and BN statistics) from another run's checkpoint into ``state``.

  ``init_cfg.workdir`` / ``init_cfg.step`` name the source; ``init_cfg.param_map``
  maps destination path prefixes to source prefixes (identity when empty). Every
  destination parameter covered by the map must exist in the source with the same
  shape, else a ValueError lists the mismatches.
  """
  raw, step = read_checkpoint_state(init_cfg.workdir, init_cfg.step or "latest")
  pairs = parse_param_map(init_cfg.param_map) or [("", "")]

  def transfer(dst_tree, src_tree, what):
    dst = traverse_util.flatten_dict(dst_tree, sep="/")
    src = traverse_util.flatten_dict(src_tree, sep="/")
    problems, copied = [], 0
    for path, value in dst.items():
      for d, s in pairs:
        if path.startswith(d):
          src_path = s + path[len(d):]
          if src_path not in src:
            if what == "params":
              problems.append(f"{path} <- {src_path}: missing in source")
            break
          if src[src_path].shape != value.shape:
            problems.append(f"{path} <- {src_path}: shape {src[src_path].shape} != {value.shape}")
            break
          dst[path] = jnp.asarray(src[src_path], value.dtype)
          copied += 1
          break
    if problems:
      raise ValueError(f"init_from {init_cfg.workdir} step {step}: cannot map {what}:\n  "
                       + "\n  ".join(problems[:20]))
    return traverse_util.unflatten_dict(dst, sep="/"), copied

  params, n = transfer(state.params, raw["params"], "params")
  if n == 0:
    raise ValueError(f"init_from {init_cfg.workdir}: no parameter matched init.param_map={init_cfg.param_map!r}")
  model_state = state.model_state
  if "model_state" in raw and raw["model_state"]:
    model_state, _ = transfer(state.model_state, raw["model_state"], "model_state")
  sharding = jax.tree.leaves(state.params)[0].sharding
  params = jax.device_put(params, sharding)
  model_state = jax.device_put(model_state, sharding)
  ema = jax.tree.map(jnp.copy, params) if state.ema_params else state.ema_params
  # The optimizer state was initialised for the old values; momentum is zero either way.
  return state.replace(params=params, model_state=model_state, ema_params=ema)
