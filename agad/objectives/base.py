"""The Objective: adversarial training as a loss-and-state transform.

An ``Objective`` is a bundle of pure functions, in the spirit of optax's
``GradientTransformation``:

    aux_state = init(key, variables, batch)
    adv       = generate(params, model_state, aux_state, batch, key, step)
    loss, (model_state, aux_state, metrics) = loss(params, model_state, aux_state,
                                                   batch, adv, key, step)

``generate`` runs outside ``value_and_grad`` and its output is gradient-stopped by the
train step; ``loss`` is differentiated w.r.t. ``params``. A transform
``Objective -> Objective`` may wrap either function (AWP wraps ``loss`` and reuses the
same ``adv``; FSR/AGKD-BML/AGAIN extend ``generate``). The training loop only ever sees
this interface, so new objectives and defenses never touch it.

``batch`` is a dict with ``image`` ``[B, H, W, C]`` float32 in [0, 1] and ``label``
``[B]`` int32. ``model_state`` holds the non-parameter collections (``batch_stats``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from agad.attacks import losses as attack_losses

PyTree = Any


class BNPolicy(NamedTuple):
  """Which forward passes use which BatchNorm mode (documented per objective).

  attack: ``"eval"`` (running statistics) or ``"batch"`` (statistics of the attacked
    batch, running averages left untouched) for the forward passes inside the attack.
  update: which training forward passes update the running statistics, in words
    (e.g. ``"adversarial"``, ``"clean+adversarial (two passes)"``).
  """
  attack: str = "eval"
  update: str = "adversarial"


class Objective(NamedTuple):
  name: str
  init: Callable[..., PyTree]
  generate: Callable[..., PyTree]
  loss: Callable[..., tuple[jax.Array, tuple[PyTree, PyTree, dict]]]
  bn_policy: BNPolicy
  # (model, variables) -> loss_fn(x, labels) -> [B] an informed attacker maximises, or a
  # dict {variant: loss_fn} of several (variant "" is reported as adaptive-pgd-k, the others
  # as adaptive-<variant>-pgd-k); None means "cross-entropy on the logits" is already the
  # adaptive attack.
  adaptive_loss: Callable[..., Callable] | None = None


def adaptive_variants(adaptive_loss) -> dict[str, Callable] | None:
  """An objective's adaptive loss (built for one model) as ``{variant: loss}``; a single
  callable is variant ``""``."""
  if adaptive_loss is None or isinstance(adaptive_loss, Mapping):
    return adaptive_loss
  return {"": adaptive_loss}


class ModelOutput(NamedTuple):
  logits: jax.Array   # [B, K] float32
  model_state: PyTree  # updated (train mode) or unchanged non-param collections
  aux: dict            # the 'aux' collection sown by plug-ins (auxiliary logits)


BN_MODES = ("train", "eval", "batch")


def forward(model: nn.Module, params: PyTree, model_state: PyTree, x: jax.Array, *,
            mode: str, labels: jax.Array | None = None, norm_ctx: Any = None) -> ModelOutput:
  """One forward pass with an explicit BatchNorm mode.

  mode: ``"train"`` batch statistics, running averages updated (returned);
    ``"eval"`` running averages; ``"batch"`` batch statistics, running averages
    unchanged (the update is discarded).
  """
  if mode not in BN_MODES:
    raise ValueError(f"BN mode {mode!r} is not one of {BN_MODES}")
  variables = {"params": params, **model_state}
  train = mode != "eval"
  mutable = ["aux"] + (["batch_stats"] if train and "batch_stats" in model_state else [])
  logits, updated = model.apply(variables, x, train=train, labels=labels, norm_ctx=norm_ctx,
                                mutable=mutable)
  updated = dict(updated)
  aux = updated.pop("aux", {})
  new_state = {**model_state, **updated} if mode == "train" else model_state
  return ModelOutput(logits.astype(jnp.float32), new_state, aux)


def logits_fn_for(model: nn.Module, params: PyTree, model_state: PyTree, *, mode: str = "eval",
                  labels: jax.Array | None = None) -> Callable[[jax.Array], jax.Array]:
  """A closure ``x -> logits`` for attacks inside a traced step (BN mode explicit)."""
  return lambda x: forward(model, params, model_state, x, mode=mode, labels=labels).logits


def cross_entropy_mean(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  return jnp.mean(attack_losses.cross_entropy(logits, labels, label_smoothing=label_smoothing))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))


def no_aux_state(key, variables, batch) -> PyTree:
  del key, variables, batch
  return {}
