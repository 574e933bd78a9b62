"""Any checkpoint as a pure ``logits_fn`` for evaluation, notebooks and transfer attacks.

``load`` reads the run's ``config.json`` and checkpoint and builds only the model (with
its plug-ins and norm layers): no training objective, no dataset, no frozen teacher.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from jax.tree_util import Partial

from agad import checkpoint as ckpt_lib
from agad import data as data_lib
from agad import defenses
from agad.objectives import base

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
  info: Any         # the dataset's DatasetInfo (classes, shape, normalisation)

  def splits(self):
    """The run's dataset splits (read on demand: ``load`` itself reads no data)."""
    return data_lib.load_dataset(self.config.data)

  def objective(self):
    """The run's training objective (for its adaptive attack); loads no frozen input."""
    return defenses.build_objective(self.config.objective.name, self.model, self.config)


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
  return defenses.use_recorded(recorded)


def load(workdir: str, step: Any = "best", *, params: str = "params", config=None) -> Loaded:
  """Restores a checkpoint of ``workdir``.

  Args:
    step: ``"best"`` (highest validation robust accuracy; clean accuracy for standard
      training, see ``checkpoint.best_metric``), ``"latest"`` or a number.
    params: ``"params"`` or ``"ema"`` (the EMA weights, if the run kept them).
  """
  if params not in ("params", "ema"):
    raise ValueError(f"params={params!r}; use 'params' or 'ema'")
  config = config or load_config(workdir)
  info = data_lib.dataset_info(config.data)
  model = defenses.build_model(config, info)
  raw, step = ckpt_lib.read_state(workdir, step)
  if params == "ema":
    if not raw.get("ema_params"):
      raise ValueError(f"{workdir} kept no EMA weights (ema_decay was 0); use params='params'")
    weights = raw["ema_params"]
  else:
    weights = raw["params"]
  variables = jax.tree.map(jnp.asarray, {"params": weights, **(raw.get("model_state") or {})})
  return Loaded(config, model, variables, step, make_logits_fn(model, variables), info)
