"""Config -> data, model, objective, optimizer; ``init_from`` weight transfer."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import traverse_util

from agad import checkpoint as ckpt_lib
from agad import data as data_lib
from agad import defenses
from agad.objectives import base
from agad.training import optim


class Experiment(NamedTuple):
  splits: Any
  info: Any
  model: Any
  objective: base.Objective


def check_config(config: Any) -> None:
  """Refuses, before any work, configs that would train or validate something other than
  what they say; each message names the field, the value and what is accepted.

  Ranges: radii in [0, 1] pixel units, positive step sizes, integer step counts, a
  positive finite learning rate, positive batch and epochs, known names. The training
  attack's radius, the validation radius (which picks "best") and the test radius must
  agree unless ``allow_eps_mismatch`` says the difference is wanted: a
  ``--config.attack.eps=...`` override alone would otherwise select and report at the old
  radius. The model must accept the dataset's images (checked on abstract shapes).
  """
  import math

  def need(ok, field, value, accepted):
    if not ok:
      raise ValueError(f"config.{field}={value!r} is invalid: {accepted}")

  for prefix, attack in (("attack", config.attack), ("validation.attack", config.validation.attack)):
    need(0.0 <= float(attack.eps) <= (1.0 if attack.norm == "linf" else 1e3), f"{prefix}.eps", attack.eps,
         "a radius in pixel units, in [0, 1] for linf (e.g. 8/255 or 0.1)")
    need(float(attack.step_size) > 0, f"{prefix}.step_size", attack.step_size, "a positive step size")
    need(int(attack.steps) == attack.steps and int(attack.steps) >= 1, f"{prefix}.steps", attack.steps,
         "an integer >= 1")
    need(attack.norm in ("linf", "l2"), f"{prefix}.norm", attack.norm, "linf | l2")
    need(attack.random_start in ("uniform", "normal", "none"), f"{prefix}.random_start",
         attack.random_start, "uniform | normal | none")
  need(config.attack.bn in ("eval", "batch"), "attack.bn", config.attack.bn, "eval | batch")
  lr = float(config.optim.lr)
  need(math.isfinite(lr) and lr > 0, "optim.lr", config.optim.lr, "a positive finite learning rate")
  need(int(config.batch_size) >= 1, "batch_size", config.batch_size, "an integer >= 1")
  need(float(config.num_epochs) > 0, "num_epochs", config.num_epochs, "a positive number of epochs")
  need(float(config.ema_decay) >= 0 and float(config.ema_decay) < 1, "ema_decay", config.ema_decay,
       "0 (off) or in (0, 1)")
  if data_lib.DATASET_NAMES and config.data.name not in data_lib.DATASET_NAMES:
    need(False, "data.name", config.data.name, f"one of {list(data_lib.DATASET_NAMES)}")
  radii = {"attack.eps": float(config.attack.eps),
           "validation.attack.eps": float(config.validation.attack.eps),
           "eval.eps": float(config.eval.eps)}
  if len(set(radii.values())) > 1 and not config.get("allow_eps_mismatch", False):
    listed = ", ".join(f"{k}={v:.6g}" for k, v in radii.items())
    raise ValueError(f"the radii differ ({listed}): override all three together, or set "
                     "--config.allow_eps_mismatch=True if the difference is intended")


def check_model_fits_data(model, config: Any, info: Any) -> None:
  """The backbone must accept the dataset's images (abstract shapes only, no compute)."""
  def refuse(why):
    return ValueError(f"model {config.model.name!r} cannot take {config.data.name!r} images of shape "
                      f"{tuple(info.image_shape)}: {why}. Pick a backbone meant for this resolution "
                      "(configs/<dataset>.py lists the usual ones).")

  try:
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False, mutable=True),
                               jax.ShapeDtypeStruct((1,) + tuple(info.image_shape), jnp.float32))
  except Exception as e:  # a shape error deep inside the backbone
    raise refuse(f"{type(e).__name__}: {str(e)[:300]}") from e
  # Pooling a too-small image leaves empty feature maps (VGG-16 on 28x28): the loss is NaN.
  flat = traverse_util.flatten_dict(dict(variables.get("intermediates", {})))
  empty = sorted(path[-1] for path, v in flat.items() if any(0 in leaf.shape for leaf in jax.tree.leaves(v)))
  if empty:
    raise refuse(f"the feature maps at {empty} are empty")


def build_experiment(config: Any) -> Experiment:
  splits = data_lib.load_dataset(config.data)
  info = splits.info
  model = defenses.build_model(config, info)
  check_model_fits_data(model, config, info)
  objective = defenses.build_objective(config.objective.name, model, config)
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


def apply_init_from(state, init_cfg: Any):
  """Copies parameters (and BN statistics) from another run's checkpoint into ``state``.

  ``init_cfg.workdir`` / ``init_cfg.step`` name the source; ``init_cfg.param_map``
  maps destination path prefixes to source prefixes (identity when empty). Every
  destination parameter covered by the map must exist in the source with the same
  shape, else a ValueError lists the mismatches, except parameters whose '/'-joined path
  matches the ``init_cfg.keep_init`` regex (comma-separated regexes), which keep their
  fresh init when the source lacks them (a defense's plug-ins or weight generator on top
  of a teacher's backbone).
  """
  raw, step = ckpt_lib.read_state(init_cfg.workdir, init_cfg.step or "latest")
  pairs = parse_param_map(init_cfg.param_map) or [("", "")]
  keep = [re.compile(p) for p in (init_cfg.get("keep_init", "") or "").split(",") if p]
  kept = []

  def transfer(dst_tree, src_tree, what):
    dst = traverse_util.flatten_dict(dst_tree, sep="/")
    src = traverse_util.flatten_dict(src_tree, sep="/")
    problems, copied = [], 0
    for path, value in dst.items():
      for d, s in pairs:
        if path.startswith(d):
          src_path = s + path[len(d):]
          if src_path not in src:
            if any(k.search(path) for k in keep):
              kept.append(path)
            elif what == "params":
              problems.append(f"{path} <- {src_path}: missing in source"
                              " (init.keep_init=REGEX keeps a fresh init for it)")
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
