"""Config -> data, model, objective, optimizer; ``init_from`` weight transfer."""

from __future__ import annotations

import json
import os
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from agad import checkpoint as ckpt_lib
from agad import data as data_lib
from agad import defenses
from agad import models as models_lib
from agad.attacks import driver as driver_lib
from agad.defenses import _validate as defense_checks
from agad.objectives import base
from agad.training import optim
from agad.validation import (
  BOOL,
  NON_NEGATIVE,
  POSITIVE,
  REGEXES,
  SEED,
  STEP,
  STR,
  Rule,
  check,
  choice_rule,
  flatten,
  int_rule,
  is_int,
  is_real,
  is_seq,
  need,
  num_rule,
  optional,
  unknown_field,
)


class Experiment(NamedTuple):
  splits: Any
  info: Any
  model: Any
  objective: base.Objective


# ------------------------------------------------------------------ config validation
# Every field of a training config (configs/common.py's base_config; eval.* aside: see
# agad/evaluation/defaults.py) has a rule in config_rules; a field without one is unknown.


def _param_map_ok(v) -> bool:
  try:
    return isinstance(v, str) and parse_param_map(v) is not None
  except ValueError:
    return False


def _shape_ok(v) -> bool:
  return is_seq(v) and len(v) == 3 and all(is_int(d) and d >= 1 for d in v)


def _increasing(v) -> bool:
  return (
    is_seq(v)
    and all(is_real(b) and b >= 0 for b in v)
    and list(v) == sorted(set(float(b) for b in v))
  )


def _attack_rules(prefix: str) -> dict:
  return {
    f"{prefix}.eps": None,  # the range depends on the norm: check_config
    f"{prefix}.step_size": num_rule(0, lo_open=True, what=" (the PGD step, pixel units)"),
    f"{prefix}.steps": int_rule(1),
    f"{prefix}.norm": choice_rule(("linf", "l2")),
    f"{prefix}.random_start": choice_rule(("uniform", "normal", "none")),
  }


def config_rules() -> dict[str, Rule | None]:
  """``{dotted field: Rule}`` for every field :func:`check_config` knows (None: checked
  there by hand). ``objective.*`` is ``agad.defenses._validate``'s, ``eval.*`` is
  ``agad.evaluation.defaults.validate_eval_config``'s."""
  return {
    "seed": SEED,
    "batch_size": None,  # an integer >= 1 dividing by the device count
    "num_epochs": num_rule(0, lo_open=True, what=" (epochs; fractions allowed)"),
    "data.name": choice_rule(data_lib.DATASET_NAMES),
    "data.data_dir": optional(STR, "the dataset's default place"),
    "data.val_size": int_rule(0, what=" (examples carved from train; 0 = no validation split)"),
    "data.val_seed": SEED,
    "data.max_train": optional(int_rule(1), "all"),
    "data.max_test": optional(int_rule(1), "all"),
    "data.num_train": int_rule(1),
    "data.num_test": int_rule(1),
    "data.image_shape": Rule(_shape_ok, "(H, W, C), three integers >= 1"),
    "data.num_classes": int_rule(2),
    "model.name": choice_rule(models_lib.MODEL_NAMES),
    "model.dtype": choice_rule(defenses.DTYPES),
    "model.input_norm": choice_rule(defenses.INPUT_NORMS),
    "model.mean": None,  # None or per-channel numbers
    "model.std": None,
    "objective.name": None,  # the spec
    **_attack_rules("attack"),
    "attack.bn": choice_rule(("eval", "batch"), what=" (train would update BN statistics)"),
    "attack.driver": choice_rule(driver_lib.DRIVERS),
    "attack.eps_warmup_steps": int_rule(0, what=" (0 = off)"),
    "optim.name": choice_rule(("sgd",)),
    "optim.lr": num_rule(0, lo_open=True, what=" (a positive finite learning rate)"),
    "optim.momentum": num_rule(0, 1, hi_open=True),
    "optim.nesterov": BOOL,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.grad_clip": num_rule(0, what=" (0 = no clipping)"),
    "optim.schedule": choice_rule(optim.SCHEDULES),
    "optim.warmup_epochs": NON_NEGATIVE,
    "optim.boundaries": Rule(_increasing, "increasing epochs >= 0, e.g. (75, 90)"),
    "optim.decay_factor": POSITIVE,
    "ema_decay": num_rule(0, 1, hi_open=True, what=" (0 = off)"),
    "validation.batch_size": int_rule(1),
    "validation.use_ema": BOOL,
    "validation.seed": SEED,
    "validation.adaptive": BOOL,
    **_attack_rules("validation.attack"),
    "checkpoint.keep": int_rule(1),
    "checkpoint.every_steps": int_rule(0, what=" (0 = only at epoch ends)"),
    "checkpoint.async_save": BOOL,
    "checkpoint.best_metric": choice_rule(
      ("",) + tuple(ckpt_lib.BEST_METRICS), what=" ('' = by the objective)"
    ),
    "init.workdir": Rule(lambda v: isinstance(v, str), "a training workdir ('' = random init)"),
    "init.step": STEP,
    "init.param_map": Rule(_param_map_ok, "'dst_prefix=src_prefix,...' ('' = identity)"),
    "init.freeze": REGEXES,
    "init.keep_init": REGEXES,
    "eps": optional(num_rule(0, 1), "attack.eps, validation.attack.eps and eval.eps as set"),
    "allow_eps_mismatch": BOOL,
    "log_every_steps": int_rule(1),
    "prefetch": int_rule(1),
    "stop_after_steps": int_rule(0, what=" (0 = run to the end)"),
  }


def check_config(config: Any, *, num_devices: int | None = None) -> None:
  """Refuses, before any work, configs that would train or validate something other than
  what they say; each message names the field, the value and what is accepted
  (``config.FIELD=VALUE is invalid: ACCEPTED``).

  Every field of ``configs/common.py``'s ``base_config`` but ``eval.*`` (its own
  ``agad.evaluation.defaults.validate_eval_config``) has a rule in :func:`config_rules`:
  types (a string is not a radius, a float is not a step count, a bool is not a number),
  ranges (radii in [0, 1] pixel units, positive step sizes and learning rate, positive
  batch and epochs), known names; a field with no rule is refused as unknown (a typo
  would otherwise be ignored). The global batch must divide by ``num_devices`` (default
  ``jax.device_count()``). ``config.objective`` (the spec and each of its names' fields)
  is checked by ``agad.defenses._validate.check_objective``. The training attack's
  radius, the validation radius (which picks "best") and the test radius must agree unless
  ``allow_eps_mismatch`` says the difference is wanted: a ``--config.attack.eps=...``
  override alone would otherwise select and report at the old radius. Values only: no
  model, no data, milliseconds; :func:`preflight` adds what needs the model.
  """
  rules = config_rules()
  for path, value in flatten(config).items():
    if path.startswith(("eval.", "objective.")) and path != "objective.name":
      continue
    if path not in rules:
      unknown_field(rules, path, value)
    if rules[path] is not None:
      check(rules[path], path, value)

  batch = config.batch_size
  need(is_int(batch) and batch >= 1, "batch_size", batch, "an integer >= 1 (the global batch)")
  n = jax.device_count() if num_devices is None else int(num_devices)
  if batch % n:
    near = [b for b in (batch - batch % n, batch - batch % n + n) if b >= 1]
    need(
      False,
      "batch_size",
      batch,
      f"a multiple of the {n} devices (the global batch is split "
      f"evenly), e.g. {' or '.join(map(str, near))}",
    )
  for prefix, attack in (
    ("attack", config.attack),
    ("validation.attack", config.validation.attack),
  ):
    linf = attack.norm == "linf"
    need(
      num_rule(0, 1.0 if linf else 1e3).ok(attack.eps),
      f"{prefix}.eps",
      attack.eps,
      "a radius in [0, 1] pixel units for linf (e.g. 8/255 or 0.1)"
      if linf
      else "a radius in [0, 1000] pixel units for l2",
    )
  channels = None
  if config.data.name == "synthetic":
    channels = config.data.image_shape[-1]
    need(
      config.data.val_size < config.data.num_train,
      "data.val_size",
      config.data.val_size,
      f"an integer in [0, data.num_train={config.data.num_train})",
    )
  else:
    channels = data_lib.dataset_info(config.data).image_shape[-1]
  lengths = sorted({1, channels})
  for key, positive in (("mean", False), ("std", True)):
    value = config.model.get(key)
    ok = value is None or (
      is_seq(value)
      and len(value) in lengths
      and all(is_real(v) and (not positive or v > 0) for v in value)
    )
    need(
      ok,
      f"model.{key}",
      value,
      f"None (the dataset's) or {' or '.join(map(str, lengths))} "
      f"{'positive ' if positive else ''}numbers, one per channel, e.g. {(0.5,) * channels}",
    )

  defense_checks.check_objective(config)

  eval_eps = config.get("eval", {}).get("eps", config.attack.eps)
  need(
    num_rule(0, 1).ok(eval_eps),
    "eval.eps",
    eval_eps,
    "a radius in [0, 1] pixel units (e.g. 8/255 or 0.1)",
  )
  radii = {
    "attack.eps": float(config.attack.eps),
    "validation.attack.eps": float(config.validation.attack.eps),
    "eval.eps": float(eval_eps),
  }
  one = config.get("eps")
  if one is not None and not config.get("allow_eps_mismatch", False):
    differ = {k: v for k, v in radii.items() if v != float(one)}
    if (
      differ
    ):  # launch.train applies config.eps; a library caller must too (launch.common.resolve_radii)
      listed = ", ".join(f"{k}={v:.6g}" for k, v in differ.items())
      raise ValueError(
        f"config.eps={float(one):.6g} but {listed}: set them to config.eps "
        "(launch.train does), or set --config.allow_eps_mismatch=True if the difference "
        "is intended"
      )
  if len(set(radii.values())) > 1 and not config.get("allow_eps_mismatch", False):
    listed = ", ".join(f"{k}={v:.6g}" for k, v in radii.items())
    raise ValueError(
      f"the radii differ ({listed}): set all three with one --config.eps=R (e.g. "
      "8/255), or set --config.allow_eps_mismatch=True if the difference is intended"
    )


def check_model_fits_data(model, config: Any, info: Any) -> None:
  """The backbone must accept the dataset's images (abstract shapes only, no compute)."""

  def refuse(why):
    return ValueError(
      f"model {config.model.name!r} cannot take {config.data.name!r} images of shape "
      f"{tuple(info.image_shape)}: {why}. Pick a backbone meant for this resolution "
      "(configs/<dataset>.py lists the usual ones)."
    )

  try:
    variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False, mutable=True),
      jax.ShapeDtypeStruct((1,) + tuple(info.image_shape), jnp.float32),
    )
  except Exception as e:  # a shape error deep inside the backbone
    raise refuse(f"{type(e).__name__}: {str(e)[:300]}") from e
  # Pooling a too-small image leaves empty feature maps (VGG-16 on 28x28): the loss is NaN.
  flat = traverse_util.flatten_dict(dict(variables.get("intermediates", {})))
  empty = sorted(
    path[-1] for path, v in flat.items() if any(0 in leaf.shape for leaf in jax.tree.leaves(v))
  )
  if empty:
    raise refuse(f"the feature maps at {empty} are empty")


def preflight(config: Any, *, num_devices: int | None = None) -> None:
  """:func:`check_config`, then what needs the model, on abstract shapes only (no data
  read, no compile): the backbone with its objective's plug-ins and norm layers (a plug-in
  site the model lacks, AFA's kept branches), a backbone that cannot take the dataset's
  images, and the objective itself (a teacher's workdir, AFA stage II's init). What
  ``launch.train`` runs before any work; the trainer builds the same things again."""
  check_config(config, num_devices=num_devices)
  info = data_lib.dataset_info(config.data)
  try:
    model = defenses.build_model(config, info)
  except ValueError as e:  # name the objective.<name>.site(s) field that holds a bad site
    for name in defenses.spec_names(config.objective.name):
      user = config.objective.get(name) or {}
      for field in ("site", "sites"):
        value = user.get(field)
        sites = (value,) if isinstance(value, str) else tuple(value or ())
        if any(f"'{s}'" in str(e) for s in sites):
          raise ValueError(
            f"config.objective.{name}.{field}={value!r} is invalid for model "
            f"{config.model.name!r}: {e}"
          ) from None
    raise
  check_model_fits_data(model, config, info)
  check_init_normalisation(config, info)
  defenses.build_objective(config.objective.name, model, config)


def _input_scaling(model_cfg, info) -> tuple:
  """What a model does to its [0, 1] pixels: ``(input_norm[, mean, std])``, the dataset's
  statistics filled in."""
  norm = model_cfg.get("input_norm") or "dataset"
  if norm != "dataset":
    return (norm,)
  mean, std = model_cfg.get("mean") or info.mean, model_cfg.get("std") or info.std
  return (norm, tuple(float(v) for v in mean), tuple(float(v) for v in std))


def check_init_normalisation(config: Any, info: Any) -> None:
  """Refuses ``init.workdir`` weights trained on differently normalised inputs (an imported
  PyTorch model that takes raw pixels, fine-tuned under a config that standardises them):
  the message gives the ``--config.model.*`` flags that match the source."""
  source = config.init.workdir
  path = os.path.join(source, "config.json") if source else ""
  if not path or not os.path.exists(path):
    return  # no init, or apply_init_from names the missing source
  with open(path) as f:
    saved = json.load(f)
  src_info = data_lib.dataset_info(ml_collections.ConfigDict(saved.get("data", {})))
  want, have = _input_scaling(saved.get("model", {}), src_info), _input_scaling(config.model, info)
  if want != have:
    flags = f"--config.model.input_norm={want[0]}" + (
      f" --config.model.mean='{want[1]}' --config.model.std='{want[2]}'" if len(want) == 3 else ""
    )
    raise ValueError(
      f"config.init.workdir={source!r} was trained on inputs normalised as {want}, this "
      f"config normalises them as {have}: its weights would see other inputs. Add {flags}"
    )


def build_experiment(config: Any) -> Experiment:
  splits = data_lib.load_dataset(config.data)
  info = splits.info
  model = defenses.build_model(config, info)
  check_model_fits_data(model, config, info)
  objective = defenses.build_objective(config.objective.name, model, config)
  return Experiment(splits, info, model, objective)


def build_optimizer(config: Any, exp: Experiment, steps_per_epoch: int, *, start_step: int = 0):
  frozen = [p for p in config.init.freeze.split(",") if p] if config.init.freeze else []
  params = None
  if frozen:
    h, w, c = exp.info.image_shape
    variables = jax.eval_shape(
      lambda: exp.model.init(jax.random.key(0), jnp.zeros((1, h, w, c)), train=False)
    )
    params = variables["params"]
  return optim.make_optimizer(
    config.optim,
    steps_per_epoch,
    config.num_epochs,
    frozen=frozen,
    params=params,
    start_step=start_step,
  )


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
          src_path = s + path[len(d) :]
          if src_path not in src:
            if any(k.search(path) for k in keep):
              kept.append(path)
            elif what == "params":
              problems.append(
                f"{path} <- {src_path}: missing in source"
                " (init.keep_init=REGEX keeps a fresh init for it)"
              )
            break
          if src[src_path].shape != value.shape:
            problems.append(f"{path} <- {src_path}: shape {src[src_path].shape} != {value.shape}")
            break
          dst[path] = jnp.asarray(src[src_path], value.dtype)
          copied += 1
          break
    if problems:
      raise ValueError(
        f"init_from {init_cfg.workdir} step {step}: cannot map {what}:\n  "
        + "\n  ".join(problems[:20])
      )
    return traverse_util.unflatten_dict(dst, sep="/"), copied

  params, n = transfer(state.params, raw["params"], "params")
  if n == 0:
    raise ValueError(
      f"init_from {init_cfg.workdir}: no parameter matched init.param_map={init_cfg.param_map!r}"
    )
  model_state = state.model_state
  if "model_state" in raw and raw["model_state"]:
    model_state, _ = transfer(state.model_state, raw["model_state"], "model_state")
  sharding = jax.tree.leaves(state.params)[0].sharding
  params = jax.device_put(params, sharding)
  model_state = jax.device_put(model_state, sharding)
  ema = jax.tree.map(jnp.copy, params) if state.ema_params else state.ema_params
  # The optimizer state was initialised for the old values; momentum is zero either way.
  return state.replace(params=params, model_state=model_state, ema_params=ema)
