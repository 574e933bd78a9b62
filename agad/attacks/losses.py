"""Per-example attack losses.

Every loss maps logits ``[B, K]`` (and labels ``[B]`` int) to a per-example loss
``[B]`` float32 that an untargeted attacker *maximises*. Attacks sum the per-example
losses before differentiating, so each example's gradient depends only on its own
loss (as long as the model itself is per-example, i.e. BatchNorm in eval mode).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

LossFn = Callable[..., jax.Array]


SMOOTHING = ("all", "others")


def pick(values: jax.Array, index: jax.Array) -> jax.Array:
  """``values[b, index[b]]`` over the last axis ``[B, K] -> [B]`` as a one-hot contraction.

  No gather in the forward pass and no scatter-add in the backward pass: one XLA:CPU
  compilation wrote NaN into the scatter-add behind a label gather's gradient (valid
  labels; docs/results/numerics.md). With finite values the result is exact (one term
  times 1, the others times 0).
  """
  onehot = jax.nn.one_hot(index, values.shape[-1], dtype=values.dtype)
  return jnp.sum(values * onehot, axis=-1)


def rows(table: jax.Array, index: jax.Array, weights: jax.Array | float = 1.0) -> jax.Array:
  """``weights * table[index]`` ``[B, C]`` for ``table [K, C]`` and ``index [B]``, as a
  one-hot matrix product (see :func:`pick`: no gather, no scatter-add in the gradient)."""
  onehot = jax.nn.one_hot(index, table.shape[0], dtype=table.dtype) * weights
  return jnp.dot(onehot, table, precision=jax.lax.Precision.HIGHEST)


def cross_entropy(
  logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0, smoothing: str = "all"
) -> jax.Array:
  """Cross-entropy ``[B]`` with optional label smoothing ``s``.

  ``smoothing="all"`` is PyTorch's ``CrossEntropyLoss(label_smoothing=s)``: the target
  puts ``1 - s + s/K`` on the true class and ``s/K`` on every other class.
  ``"others"`` spreads ``s`` over the other classes only: ``1 - s`` on the true class,
  ``s/(K-1)`` elsewhere (AGKD-BML's 0.5 -> 0.5/9 on CIFAR-10).
  """
  if smoothing not in SMOOTHING:
    raise ValueError(f"label smoothing kind {smoothing!r} is not one of {SMOOTHING}")
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing and smoothing == "all":
    onehot = onehot * (1.0 - label_smoothing) + label_smoothing / num_classes
  elif label_smoothing:
    if num_classes < 2:
      raise ValueError("label smoothing over the other classes needs at least 2 classes")
    onehot = onehot * (1.0 - label_smoothing) + (1.0 - onehot) * (
      label_smoothing / (num_classes - 1)
    )
  return -jnp.sum(onehot * log_probs, axis=-1)


def margin(logits: jax.Array, labels: jax.Array, *, kappa: float | None = None) -> jax.Array:
  """Carlini-Wagner margin ``max_{j != y} z_j - z_y`` ``[B]``.

  Positive means misclassified. With ``kappa`` the loss is clipped at ``kappa``
  (``min(margin, kappa)``), the C&W-inf form used by the papers' "C&W" rows: once the
  margin exceeds kappa the example stops contributing gradient.
  """
  logits = logits.astype(jnp.float32)
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  true_logit = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
  other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
  value = other - true_logit
  if kappa is not None:
    value = jnp.minimum(value, kappa)
  return value


def kl_divergence(probs_ref: jax.Array, logits: jax.Array) -> jax.Array:
  """``KL(p_ref || softmax(logits))`` per example ``[B]``.

  ``probs_ref`` are fixed reference probabilities (TRADES: the clean prediction,
  computed once before the attack). Terms with ``p_ref = 0`` contribute 0, matching
  PyTorch's ``KLDivLoss``.
  """
  log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  log_p = jnp.log(jnp.where(probs_ref > 0, probs_ref, 1.0))
  return jnp.sum(jnp.where(probs_ref > 0, probs_ref * (log_p - log_q), 0.0), axis=-1)


LOSSES = ("ce", "margin", "kl")
