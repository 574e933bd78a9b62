"""TrainState: everything a run needs to continue, saved and restored whole."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

# Collections that linen creates during init but that are not persistent model state.
TRANSIENT_COLLECTIONS = ("params", "intermediates", "aux", "perturbations")


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar, number of optimizer updates done
  params: Any
  model_state: Any  # non-parameter collections, e.g. {'batch_stats': ...}
  opt_state: Any
  aux_state: Any  # objective / defense state (teacher params, ...)
  ema_params: Any  # EMA of params ({} when disabled)
  key: jax.Array  # typed PRNG key; per-step keys are fold_in(key, step)


def split_variables(variables: Any) -> tuple[Any, Any]:
  """Linen variables -> (params, persistent model_state)."""
  variables = dict(variables)
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k not in TRANSIENT_COLLECTIONS}
  return params, model_state


def init_train_state(
  model, objective, tx, sample_batch: dict, key: jax.Array, *, ema_decay: float
) -> TrainState:
  """Pure initialiser (jit it with replicated out_shardings)."""
  k_model, k_aux, k_run = jax.random.split(key, 3)
  variables = model.init(k_model, sample_batch["image"], train=False, labels=sample_batch["label"])
  params, model_state = split_variables(variables)
  aux_state = objective.init(k_aux, {"params": params, **model_state}, sample_batch)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    model_state=model_state,
    opt_state=tx.init(params),
    aux_state=aux_state,
    ema_params=jax.tree.map(jnp.copy, params) if ema_decay > 0 else {},
    key=k_run,
  )
