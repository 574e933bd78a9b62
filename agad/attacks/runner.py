"""The runner shared by APGD, FAB and Square, and AutoAttack's bucketing.

* ``run_steps``: a host loop over jitted chunks of an attack's step
  (``agad.attacks.driver.iterate``) with an optional early exit between chunks
  (``nothing_left``), so a run stops once no example is left to attack.
* Per-example helpers every attack uses: ``lp_norm``, ``normalize``, ``bwhere``,
  ``barrier`` (ends a step with an optimisation barrier), ``call_logits``.
* ``TRACE_COUNTS``: a per-(attack, batch-size) count of how often a step was traced
  (``count_trace``); tests use it to prove one compile per bucket size.
* Bucketing: ``bucket_sizes`` and ``padded_batches`` split a shrinking set of example
  indices into batches padded (with copies of a real row, masked out) to a few fixed
  sizes, so that every attack compiles at most once per bucket size.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from agad.attacks import driver as driver_lib
from agad.attacks.driver import is_traced

NORMS = ("linf", "l2")

# (attack tag, batch size) -> number of times an attack's step was traced. A compiled
# chunk of k unrolled steps traces the step k times, so a count above the chunk size
# means a recompile. Diagnostic only (tests use it).
TRACE_COUNTS: collections.Counter = collections.Counter()


def count_trace(tag: str, x: jax.Array) -> None:
  """Records one trace of ``tag``'s step for batch size ``x.shape[0]`` (no-op eagerly)."""
  if isinstance(x, jax.core.Tracer):
    TRACE_COUNTS[(tag, int(x.shape[0]))] += 1


def lp_norm(v: jax.Array, norm: str) -> jax.Array:
  """Per-example norm ``[B]`` of ``v`` ``[B, ...]``."""
  flat = v.reshape(v.shape[0], -1)
  if norm == "linf":
    return jnp.max(jnp.abs(flat), axis=-1)
  if norm == "l2":
    return jnp.sqrt(jnp.sum(jnp.square(flat), axis=-1))
  raise ValueError(f"norm {norm!r} is not one of {NORMS}")


def normalize(v: jax.Array, norm: str) -> jax.Array:
  """``v / (||v|| + 1e-12)`` per example (the reference's ``normalize``)."""
  return v / (lp_norm(v, norm).reshape((-1,) + (1,) * (v.ndim - 1)) + 1e-12)


def bwhere(mask: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """``where`` with a ``[B]`` mask broadcast over the trailing axes of ``a``."""
  return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - mask.ndim)), a, b)


def barrier(state: Any) -> Any:
  """Ends a step with ``lax.optimization_barrier`` on the state's arrays.

  Without it, XLA fuses (and duplicates) elementwise work across the unrolled steps of a
  chunk and compile time grows superlinearly with the chunk length (measured on
  XLA:CPU: FAB, 10 unrolled steps, 21 s -> 2.9 s). PRNG keys pass through untouched.
  """
  leaves, treedef = jax.tree.flatten(state)
  is_key = [jnp.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key) for leaf in leaves]
  plain = jax.lax.optimization_barrier([l for l, k in zip(leaves, is_key) if not k])
  plain_iter = iter(plain)
  return jax.tree.unflatten(treedef, [l if k else next(plain_iter) for l, k in zip(leaves, is_key)])


def call_logits(logits_fn: Callable, x: jax.Array, key: jax.Array | None, stochastic: bool):
  return logits_fn(x, key) if stochastic else logits_fn(x)


@functools.partial(jax.jit, static_argnums=(2,))
def _loop_block(step: Partial, state: Any, num_steps: int) -> Any:
  return driver_lib.iterate(step, state, num_steps, driver="loop")


def run_steps(step: Callable, state: Any, num_steps: int, *, driver: str = "auto",
              chunk: int = 10, done: Callable[[Any], bool] | None = None,
              check_every: int | None = None) -> Any:
  """Runs ``state = step(state)`` ``num_steps`` times, maybe stopping early.

  ``"host"``: jitted chunks of ``chunk`` unrolled steps through
  ``agad.attacks.driver.iterate`` (one compile per chunk length); ``"loop"``: jitted
  ``fori_loop`` blocks of ``check_every`` steps (default: all of them). Between chunks
  or blocks, ``done(state)`` (a host check) may end the run; the attacks use it only
  when nothing is left to attack, so it never changes a result. Under a trace
  (``"unroll"``) no early exit is possible.
  """
  resolved = driver_lib.resolve_driver(driver, state, step)
  if num_steps <= 0:
    return state
  if resolved == "unroll":
    return driver_lib.iterate(step, state, num_steps, driver="unroll")
  step = driver_lib.as_partial(step)
  if resolved == "loop":
    block = num_steps if (done is None or check_every is None) else max(1, check_every)
  else:
    block = max(1, chunk)
  completed = 0
  while completed < num_steps:
    k = min(block, num_steps - completed)
    if resolved == "loop":
      state = _loop_block(step, state, k)
    else:
      state = driver_lib.iterate(step, state, k, driver="host", chunk=k)
    completed += k
    if done is not None and completed < num_steps and done(state):
      break
  return state


def nothing_left(robust: jax.Array, valid: jax.Array | None) -> bool:
  """Host check: no (valid) example is left to attack. False under a trace."""
  if is_traced(robust, valid):
    return False
  alive = robust if valid is None else robust & valid
  return not bool(jnp.any(alive))


# ---------------------------------------------------------------------------- buckets


def bucket_sizes(batch_size: int, min_bucket: int = 8) -> list[int]:
  """``batch_size`` and the powers of two below it down to ``min_bucket``, descending."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  sizes = {batch_size}
  power = 1
  while power < batch_size:
    if power >= min(min_bucket, batch_size):
      sizes.add(power)
    power *= 2
  return sorted(sizes, reverse=True)


def bucket_for(n: int, sizes: Sequence[int]) -> int:
  """The smallest bucket size in ``sizes`` that holds ``n`` rows."""
  return min(s for s in sizes if s >= n)


def padded_batches(indices: np.ndarray, batch_size: int, sizes: Sequence[int]
                   ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
  """Splits ``indices`` ``[M]`` into batches of at most ``batch_size``, padded to a bucket.

  Yields ``(start, real [m], padded [bucket], valid [bucket] bool)`` per batch: ``start``
  is the batch's offset in ``indices``, ``padded`` repeats ``real[0]`` up to the bucket
  size (``bucket_for(m, sizes)``), and ``valid`` is False on the padding rows.
  """
  for start in range(0, len(indices), batch_size):
    real = indices[start:start + batch_size]
    bucket = bucket_for(len(real), sizes)
    padded = np.concatenate([real, np.repeat(real[:1], bucket - len(real))])
    yield start, real, padded, np.arange(bucket) < len(real)
