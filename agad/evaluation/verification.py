"""Re-verification of stored adversarial examples by a separate forward pass.

A point counts as broken only if its stored image is finite, inside [0, 1], inside the
eps-ball around the clean image (AutoAttack's 1e-6 slack for float rounding; the size is
measured in float64) and misclassified by ``verify_logits_fn`` (the suite gives it a
float32 forward pass of the model where one exists). A clean-misclassified point stores
its clean image, which passes exactly when the verifying model also gets it wrong.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

SLACK = 1e-6  # As AutoAttack's _NORM_SLACK.
FAILURES = ("nonfinite", "outside_ball", "outside_box", "not_misclassified")


@functools.partial(jax.jit, static_argnums=(3,))
def _predict(logits_fn, x, key, stochastic: bool):
  logits = logits_fn(x, key) if stochastic else logits_fn(x)
  return jnp.argmax(logits, -1)


def check(
  logits_fn,
  clean: np.ndarray,
  adversarial: np.ndarray,
  labels: np.ndarray,
  *,
  eps: float | None,
  norm: str = "linf",
  key=None,
  stochastic: bool = False,
  batch_size: int = 500,
) -> dict[str, np.ndarray]:
  """Per-example failure masks of stored adversarials.

  Args:
    logits_fn: the verifying forward pass, ``x [B,H,W,C] -> logits [B,K]`` (``(x, key)`` if
      ``stochastic``).
    clean, adversarial: ``[n, H, W, C]`` float32 in [0, 1]; labels: ``[n]`` int.
    eps: the radius to check (None: no ball check); norm: ``"linf"`` or ``"l2"``.
  Returns:
    ``{failure: [n] bool}`` for each of ``FAILURES`` and ``"ok"`` ``[n] bool`` (none failed).
  """
  if norm not in ("linf", "l2"):
    raise ValueError(f"norm {norm!r} is not one of ('linf', 'l2')")
  n = len(labels)
  adversarial = np.asarray(adversarial, np.float32)
  flat = adversarial.reshape(n, -1)
  delta = flat.astype(np.float64) - np.asarray(clean, np.float32).reshape(n, -1).astype(np.float64)
  size = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
  if n == 0:
    size = np.zeros(0)
  out = {
    "nonfinite": ~np.isfinite(flat).all(1) if n else np.zeros(0, bool),
    "outside_ball": (
      np.zeros(n, bool) if eps is None else ~(np.nan_to_num(size, nan=np.inf) <= float(eps) + SLACK)
    ),
    "outside_box": ((flat < 0) | (flat > 1)).any(1) if n else np.zeros(0, bool),
  }
  pred = np.zeros(n, np.int64)
  key = jax.random.key(0) if key is None else key
  for s in range(0, n, batch_size):
    x = np.nan_to_num(adversarial[s : s + batch_size])
    # Padded to batch_size or a power of two (>= 8): a few compiled shapes, not one per count.
    size = (
      batch_size if n - s >= batch_size else min(batch_size, max(8, 1 << (len(x) - 1).bit_length()))
    )
    padded = np.concatenate([x, np.repeat(x[:1], size - len(x), axis=0)])
    p = _predict(logits_fn, jnp.asarray(padded), jax.random.fold_in(key, s), stochastic)
    pred[s : s + len(x)] = np.asarray(p)[: len(x)]
  out["not_misclassified"] = pred == np.asarray(labels)
  out["ok"] = ~np.any([out[k] for k in FAILURES], axis=0) if n else np.zeros(0, bool)
  return out


def counts(masks: dict[str, np.ndarray]) -> dict[str, int]:
  """``{"checked": n, failure: count}`` of :func:`check`'s masks."""
  return {"checked": int(len(masks["ok"])), **{k: int(masks[k].sum()) for k in FAILURES}}
