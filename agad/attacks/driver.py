"""Drivers that run an attack's pure ``step`` function ``num_steps`` times.

Why several drivers (measured, see ``../shared/reference/cpu_performance.md`` and
WORKSPACE.md): on XLA:CPU a convolution inside any while-loop body (``fori_loop``,
``scan``) runs 7-12x slower than straight-line code, and partial unrolling is worse.

- ``"unroll"``: a Python loop, i.e. fully unrolled when traced. Used for the short
  training attack inside the jitted train step.
- ``"loop"``: ``lax.fori_loop`` in-graph; the right choice on GPU/TPU for long attacks.
- ``"host"``: a host loop over a jitted, fully unrolled ``chunk``-step program. One
  compile per (step function, chunk size); the right choice for long attacks on CPU.
- ``"auto"``: ``"unroll"`` when called under a trace, otherwise ``"host"`` on CPU and
  ``"loop"`` elsewhere.

For ``"host"`` the step must be a pytree-carrying callable (``jax.tree_util.Partial``)
or a hashable function: its leaves become arguments of the jitted chunk, so the same
step *function* with new arrays does not recompile.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
from jax.tree_util import Partial

DRIVERS = ("auto", "unroll", "loop", "host")


def is_traced(*trees: Any) -> bool:
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees))


def resolve_driver(driver: str, *trees: Any) -> str:
  """Turns ``"auto"`` into a concrete driver for these inputs."""
  if driver not in DRIVERS:
    raise ValueError(f"attack driver {driver!r} is not one of {DRIVERS}")
  if driver != "auto":
    return driver
  if is_traced(trees):
    return "unroll"
  return "host" if jax.default_backend() == "cpu" else "loop"


def as_partial(fn: Callable) -> Partial:
  """Wraps a plain function as a leafless ``Partial`` (hashed by identity)."""
  return fn if isinstance(fn, Partial) else Partial(fn)


@functools.partial(jax.jit, static_argnums=(2,))
def _run_chunk(step: Partial, state: Any, num_steps: int) -> Any:
  for _ in range(num_steps):
    state = step(state)
  return state


def _fori(step: Callable[[Any], Any], state: Any, num_steps: int) -> Any:
  return jax.lax.fori_loop(0, num_steps, lambda _, s: step(s), state)


_run_loop = jax.jit(_fori, static_argnums=(2,))


def iterate(
  step: Callable[[Any], Any], state: Any, num_steps: int, *, driver: str = "auto", chunk: int = 10
) -> Any:
  """Applies ``state = step(state)`` ``num_steps`` times with the chosen driver."""
  driver = resolve_driver(driver, state, step)
  if num_steps <= 0:
    return state
  if driver == "unroll":
    for _ in range(num_steps):
      state = step(state)
    return state
  if driver == "loop":
    if is_traced((state, step)):
      return _fori(step, state, num_steps)
    # Eagerly, a bare fori_loop re-traces and re-compiles its body on every call
    # (measured on an H100: PGD-20 on 1,000 Fashion-MNIST images took 1.04 s per call,
    # nearly all of it compilation); one jitted program per (step function, num_steps)
    # compiles once.
    return _run_loop(as_partial(step), state, num_steps)
  if is_traced((state, step)):
    raise ValueError("attack driver 'host' cannot run under jit; use driver='unroll' or 'loop'")
  step = as_partial(step)
  done = 0
  while done < num_steps:
    k = min(chunk, num_steps - done)
    state = _run_chunk(step, state, k)
    done += k
  return state
