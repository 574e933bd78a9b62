"""Difference-of-logits-ratio (DLR) losses of Croce & Hein (2020), per example.

With the logits of one example sorted in decreasing order, ``z_(1) >= z_(2) >= ...``:

  DLR(z, y)             = -(z_y - max_{i != y} z_i) / (z_(1) - z_(3) + 1e-12)
  targeted DLR(z, y, t) = -(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2 + 1e-12)

Both are maximised by the attacker and are unchanged by adding a constant to all logits
or multiplying them by a positive number (up to the 1e-12 guard). DLR needs at least 3
classes, targeted DLR at least 4. The 1e-12 terms are those of the reference code
(fra31/auto-attack, ``autopgd_base.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_GUARD = 1e-12


def _top(logits: jax.Array, k: int, name: str) -> jax.Array:
  num_classes = logits.shape[-1]
  if num_classes < k:
    raise ValueError(f"{name} needs at least {k} classes, the logits have {num_classes}")
  return jax.lax.top_k(logits, k)[0]


def _pick(logits: jax.Array, index: jax.Array) -> jax.Array:
  # A one-hot sum rather than a gather: gathers compile slowly on XLA:CPU when unrolled.
  onehot = jax.nn.one_hot(index, logits.shape[-1], dtype=bool)
  return jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)


def dlr(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Untargeted DLR loss ``[B]`` (see module docstring); positive iff misclassified."""
  logits = logits.astype(jnp.float32)
  top = _top(logits, 3, "DLR")
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  true_logit = _pick(logits, labels)
  best_other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
  return -(true_logit - best_other) / (top[:, 0] - top[:, 2] + _GUARD)


def dlr_targeted(logits: jax.Array, labels: jax.Array, targets: jax.Array) -> jax.Array:
  """Targeted DLR loss ``[B]`` towards ``targets`` (see module docstring)."""
  logits = logits.astype(jnp.float32)
  top = _top(logits, 4, "targeted DLR")
  numerator = _pick(logits, labels) - _pick(logits, targets)
  return -numerator / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + _GUARD)


def ranked_targets(logits: jax.Array, num_targets: int) -> jax.Array:
  """Classes ranked 2..``num_targets + 1`` by logit, ``[B, num_targets]`` int32.

  Column ``j`` holds, for every example, the class with the ``(j + 2)``-th largest
  logit, the target order AutoAttack's APGD-T and FAB-T use.
  """
  num_classes = logits.shape[-1]
  if not 1 <= num_targets <= num_classes - 1:
    raise ValueError(f"num_targets={num_targets} must be in [1, {num_classes - 1}]")
  # Descending order; ties broken towards the larger class index as a stable ascending
  # sort read backwards would (the reference reads ``sort(...)[1][:, -k]``).
  order = jnp.argsort(logits.astype(jnp.float32), axis=-1, stable=True)[:, ::-1]
  return order[:, 1 : num_targets + 1].astype(jnp.int32)
