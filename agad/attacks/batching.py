"""How every attack steps and batches its examples: the step loop shared by APGD, FAB and
Square, the per-example helpers and keys, and AutoAttack's bucketing.

* ``run_steps``: a host loop over jitted chunks of an attack's step
  (``agad.attacks.driver.iterate``) with an optional early exit between chunks
  (``nothing_left``), so a run stops once no example is left to attack.
* Per-example helpers every attack uses: ``lp_norm``, ``normalize``, ``bwhere``,
  ``barrier`` (ends a step with an optimisation barrier), ``call_logits``.
* ``TRACE_COUNTS``: a per-(attack, batch-size) count of how often a step was traced
  (``count_trace``); tests use it to prove one compile per bucket size.
* Per-example keys (``example_keys`` and the ``*_each`` draws): every random choice that
  concerns an example comes from that example's key, so results do not depend on the
  batch it shares or on the batch size.
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


# ------------------------------------------------------------------- per-example keys


def example_keys(key: jax.Array, batch: int) -> jax.Array:
  """Per-example PRNG keys ``[B]``: ``key`` itself if it is already ``[B]`` keys, else
  ``fold_in(key, row)`` for rows ``0 .. B-1``.

  Every random draw of APGD, FAB and Square that depends on an example (start points,
  Square's squares and signs) is drawn from that example's key alone, so an example's
  result does not depend on which examples share its batch or on the batch size.
  AutoAttack passes ``fold_in(stage/round key, example index)`` (the index in the
  evaluated set); a single key gives row-indexed keys.
  """
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if key.ndim == 1:
    if key.shape[0] != batch:
      raise ValueError(
        f"per-example keys have shape {key.shape}, the batch is {batch}: pass "
        "one key or one key per example"
      )
    return key
  if key.ndim != 0:
    raise ValueError(f"key must be one PRNG key or [B] keys, got shape {key.shape}")
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))


def batch_key(keys: jax.Array) -> jax.Array:
  """One key for batch-level randomness (a randomised model's noise) from ``[B]`` keys.

  A stochastic model draws its noise for the whole batch, so only deterministic models
  get batch-size-independent results."""
  return jax.random.fold_in(keys[0], keys.shape[0])


def fold_in_each(keys: jax.Array, data: int) -> jax.Array:
  """``fold_in(k, data)`` for each of ``[B]`` keys."""
  return jax.vmap(lambda k: jax.random.fold_in(k, data))(keys)


def split_each(keys: jax.Array, num: int = 2) -> tuple[jax.Array, ...]:
  """``num`` arrays of ``[B]`` keys: ``split(k, num)`` for each of ``[B]`` keys."""
  parts = jax.vmap(lambda k: jax.random.split(k, num))(keys)  # [B, num]
  return tuple(parts[:, i] for i in range(num))


def uniform_each(
  keys: jax.Array, shape: tuple[int, ...], minval=0.0, maxval=1.0, dtype=jnp.float32
) -> jax.Array:
  """``[B, *shape]`` uniforms, row b from ``keys[b]`` alone."""
  return jax.vmap(lambda k: jax.random.uniform(k, shape, dtype, minval, maxval))(keys)


def normal_each(keys: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """``[B, *shape]`` standard normals, row b from ``keys[b]`` alone."""
  return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(keys)


def rademacher_each(keys: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """``[B, *shape]`` random signs, row b from ``keys[b]`` alone."""
  return jax.vmap(lambda k: jax.random.rademacher(k, shape, dtype))(keys)


@functools.partial(jax.jit, static_argnums=(2,))
def _loop_block(step: Partial, state: Any, num_steps: int) -> Any:
  return driver_lib.iterate(step, state, num_steps, driver="loop")


def run_steps(
  step: Callable,
  state: Any,
  num_steps: int,
  *,
  driver: str = "auto",
  chunk: int = 10,
  done: Callable[[Any], bool] | None = None,
  check_every: int | None = None,
  on_block: Callable[[int, Any], None] | None = None,
) -> Any:
  """Runs ``state = step(state)`` ``num_steps`` times, maybe stopping early.

  ``"host"``: jitted chunks of ``chunk`` unrolled steps through
  ``agad.attacks.driver.iterate`` (one compile per chunk length); ``"loop"``: jitted
  ``fori_loop`` blocks of ``check_every`` steps (default: all of them). Between chunks
  or blocks, ``done(state)`` (a host check) may end the run; the attacks use it only
  when nothing is left to attack, so it never changes a result. ``on_block(completed,
  state)``, if given, runs on the host after each chunk or block (progress reports; it
  must not change the state). Under a trace (``"unroll"``) neither early exit nor
  ``on_block`` is possible.
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
    if on_block is not None:
      on_block(completed, state)
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


def bucket_sizes(batch_size: int, min_bucket: int = 8, per_octave: int = 4) -> list[int]:
  """``batch_size`` and, below it, ``per_octave`` sizes per power of two, descending.

  The sizes between ``P`` and ``2P`` (``P`` a power of two >= ``min_bucket``) are
  ``P + j * P // per_octave``, so a batch is padded by less than ``1 / per_octave`` of
  its size (plain powers of two, ``per_octave=1``, padded 131 rows to 250: 1.9x the
  work on CPU). Each size compiles once per attack; results do not depend on the bucket
  (per-example keys, ``example_keys``).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if per_octave < 1:
    raise ValueError(f"per_octave must be >= 1, got {per_octave}")
  sizes = {batch_size}
  power = 1
  while power < batch_size:
    if power >= min(min_bucket, batch_size):
      for j in range(per_octave):
        size = power + j * max(power // per_octave, 1)
        if size < batch_size and size < 2 * power:
          sizes.add(size)
    power *= 2
  return sorted(sizes, reverse=True)


def bucket_for(n: int, sizes: Sequence[int]) -> int:
  """The smallest bucket size in ``sizes`` that holds ``n`` rows."""
  return min(s for s in sizes if s >= n)


def padded_batches(
  indices: np.ndarray, batch_size: int, sizes: Sequence[int]
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
  """Splits ``indices`` ``[M]`` into batches of at most ``batch_size``, padded to a bucket.

  Yields ``(start, real [m], padded [bucket], valid [bucket] bool)`` per batch: ``start``
  is the batch's offset in ``indices``, ``padded`` repeats ``real[0]`` up to the bucket
  size (``bucket_for(m, sizes)``), and ``valid`` is False on the padding rows.
  """
  for start in range(0, len(indices), batch_size):
    real = indices[start : start + batch_size]
    bucket = bucket_for(len(real), sizes)
    padded = np.concatenate([real, np.repeat(real[:1], bucket - len(real))])
    yield start, real, padded, np.arange(bucket) < len(real)
