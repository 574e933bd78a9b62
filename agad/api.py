"""Any checkpoint as a pure ``logits_fn`` for evaluation, notebooks and transfer attacks.

``load`` reads the run's ``config.json`` and checkpoint and builds only the model (with
its plug-ins and norm layers): no training objective, no dataset, no frozen teacher.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ml_collections
from jax.tree_util import Partial

from agad import data as data_lib
from agad import defenses
from agad.defenses import load_config, use_recorded_defenses  # noqa: F401  (agad.api's own names)
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
  variables: dict  # {'params': ..., 'batch_stats': ...} ready for model.apply
  step: int
  logits_fn: Partial
  info: Any  # the dataset's DatasetInfo (classes, shape, normalisation)

  def splits(self):
    """The run's dataset splits (read on demand: ``load`` itself reads no data)."""
    return data_lib.load_dataset(self.config.data)

  def objective(self):
    """The run's training objective (for its adaptive attack); loads no frozen input."""
    return defenses.build_objective(self.config.objective.name, self.model, self.config)


def load(workdir: str, step: Any = "best", *, params: str = "params", config=None) -> Loaded:
  """Restores a checkpoint of ``workdir``.

  Args:
    step: ``"best"`` (highest validation robust accuracy; clean accuracy for standard
      training, see ``checkpoint.best_metric``), ``"latest"`` or a number.
    params: ``"params"`` or ``"ema"`` (the EMA weights, if the run kept them).
  """
  config, info, model, variables, step = defenses.restore(
    workdir, step, params=params, config=config
  )
  return Loaded(config, model, variables, step, make_logits_fn(model, variables), info)
