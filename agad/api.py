"""Any checkpoint as a pure ``logits_fn`` for evaluation, notebooks and transfer attacks."""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from jax.tree_util import Partial

from agad.objectives import base
from agad.training import builders
from agad.training import checkpoint as ckpt_lib

_EVAL_APPLY: dict[int, tuple[Any, Any]] = {}


def _eval_apply_for(model):
  """One stable function object per model, so jit caches keyed on it hit."""
  entry = _EVAL_APPLY.get(id(model))
  if entry is None or entry[0] is not model:
    def apply(variables, x):
      params = variables["params"]
      rest = {k: v for k, v in variables.items() if k != "params"}
      return base.forward(model, params, rest, x, mode="eval").logits
    entry = (model, apply)
    _EVAL_APPLY[id(model)] = entry
  return entry[1]


def make_logits_fn(model, variables: dict) -> Partial:
  """``x [B,H,W,C] in [0,1] -> logits [B,K]`` with eval-mode BN, as a ``Partial``.

  The variables are pytree leaves of the returned callable, so attacks jit it once
  and reuse the compiled code for any batch of the same shape.
  """
  return Partial(_eval_apply_for(model), variables)


class Loaded(NamedTuple):
  config: ml_collections.ConfigDict
  model: Any
  variables: dict   # {'params': ..., 'batch_stats': ...} ready for model.apply
  step: int
  logits_fn: Partial
  experiment: builders.Experiment


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(os.path.abspath(workdir), "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir} is not an agad training workdir")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load(workdir: str, step: Any = "best", *, params: str = "params", config=None) -> Loaded:
  """Restores a checkpoint of ``workdir``.

  Args:
    step: ``"best"`` (highest validation robust accuracy; clean accuracy for standard
      training, see ``checkpoint.best_metric``), ``"latest"`` or a number.
    params: ``"params"`` or ``"ema"`` (the EMA weights, if the run kept them).
  """
  config = config or load_config(workdir)
  exp = builders.build_experiment(config)
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  step = builders.resolve_step(directory, step)
  raw, _ = builders.read_checkpoint_state(workdir, step)
  if params == "ema":
    if not raw.get("ema_params"):
      raise ValueError(f"{workdir} kept no EMA weights (ema_decay was 0); use params='params'")
    weights = raw["ema_params"]
  elif params == "params":
    weights = raw["params"]
  else:
    raise ValueError(f"params={params!r}; use 'params' or 'ema'")
  variables = jax.tree.map(jnp.asarray, {"params": weights, **(raw.get("model_state") or {})})
  return Loaded(config, exp.model, variables, step, make_logits_fn(exp.model, variables), exp)
