"""Square Attack (Andriushchenko et al., ECCV 2020), L-inf, score-based black box.

Minimises the margin ``z_y - max_{j != y} z_j`` (or ``-CE``) with random search, per
example:

  start:  x = clip(x0 + eps * s),  s in {-1, +1}, one sign per (column, channel)
          (vertical stripes)
  query:  pick a square of side h_q = max(round(sqrt(p_q * H * W)), 1) (at most min(H, W))
          at a random corner, set it to ``x + 2 eps * s_c`` (one random sign per channel),
          project onto the eps-ball and [0, 1]; keep the new point if its loss is lower
          or it is misclassified. Examples with margin <= 0 stop.
  p_q:    p_init, halved after queries 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000
          (query counts rescaled to a 10000-query budget only if ``rescale_schedule``;
          AutoAttack does not rescale).

Constants and the accept rule follow fra31/auto-attack ``square.py`` (including its
corner draw ``floor(U * (H - s))``, which never uses the last position). Unlike the
reference, which draws one square position and one channel sign per query for the whole
batch, each example draws its own (as in the original Square Attack code), so a result
does not depend on which other examples share the batch (or on padding rows).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from agad.attacks import driver as driver_lib
from agad.attacks import losses
from agad.attacks.apgd import (barrier, bwhere, call_logits, count_trace, nothing_left,
                               per_example, run_steps)

SQUARE_LOSSES = ("margin", "ce")
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_p(iteration: int, p_init: float = 0.8, n_queries: int = 5000,
             rescale_schedule: bool = False) -> float:
  """The fraction p of the image a square covers at 0-based query ``iteration``."""
  it = int(iteration / n_queries * 10000) if rescale_schedule else iteration
  halvings = sum(it > threshold for threshold in _HALVINGS)
  return p_init / 2 ** halvings


def square_sizes(height: int, width: int, n_queries: int, p_init: float = 0.8,
                 rescale_schedule: bool = False) -> np.ndarray:
  """Square side for every query ``[n_queries]`` int32 (Python ``round``, as the reference)."""
  sizes = []
  for it in range(n_queries):
    p = square_p(it, p_init, n_queries, rescale_schedule)
    side = max(int(round(math.sqrt(p * height * width))), 1)
    sizes.append(min(side, height, width))
  return np.asarray(sizes, np.int32)


class SquareState(NamedTuple):
  x_best: jax.Array      # [B, H, W, C]
  margin: jax.Array      # [B] margin of x_best (<= 0: misclassified)
  loss: jax.Array        # [B] loss of x_best (the accept criterion)
  queries: jax.Array     # [B] int32 queries used
  it: jax.Array          # [] int32 query index
  key: jax.Array


@functools.lru_cache(maxsize=None)
def _margin_and_loss_rule(loss: str, stochastic: bool) -> Callable:
  if loss not in SQUARE_LOSSES:
    raise ValueError(f"loss {loss!r} is not one of {SQUARE_LOSSES}")

  def fn(logits_fn, labels, x, key):
    logits = call_logits(logits_fn, x, key, stochastic).astype(jnp.float32)
    margin = -losses.margin(logits, labels)
    value = margin if loss == "margin" else -losses.cross_entropy(logits, labels)
    return margin, value

  return fn


@functools.lru_cache(maxsize=None)
def _init_rule(loss: str, stochastic: bool) -> Callable:
  margin_and_loss = _margin_and_loss_rule(loss, stochastic)

  def init(logits_fn, x0, labels, eps, key) -> SquareState:
    stripe_key, loss_key, key = jax.random.split(key, 3)
    batch, _, width, channels = x0.shape
    signs = jax.random.rademacher(stripe_key, (batch, 1, width, channels), jnp.float32)
    x = jnp.clip(x0 + per_example(eps, x0) * signs, 0.0, 1.0)
    margin, value = margin_and_loss(logits_fn, labels, x, loss_key)
    return SquareState(x_best=x, margin=margin, loss=value,
                       queries=jnp.ones((batch,), jnp.int32), it=jnp.zeros((), jnp.int32),
                       key=key)

  return jax.jit(init)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _draw(key: jax.Array, n_queries: int, batch: int, channels: int):
  """All random choices of a run, drawn at once: unrolled random-number ops compile slowly.

  Returns corner uniforms ``[n_queries, B, 2]`` float32 and channel signs
  ``[n_queries, B, C]`` int8 (about ``n_queries * B * (8 + C)`` bytes).
  """
  corner_key, sign_key = jax.random.split(key)
  uniforms = jax.random.uniform(corner_key, (n_queries, batch, 2), jnp.float32)
  signs = jax.random.rademacher(sign_key, (n_queries, batch, channels), jnp.int8)
  return uniforms, signs


@functools.lru_cache(maxsize=None)
def _step_rule(loss: str, stochastic: bool) -> Callable:
  margin_and_loss = _margin_and_loss_rule(loss, stochastic)

  def step(logits_fn, x0, labels, eps, sizes, uniforms, signs, state: SquareState) -> SquareState:
    count_trace("square", state.x_best)
    batch, height, width, channels = x0.shape
    key, loss_key = jax.random.split(state.key) if stochastic else (state.key, state.key)
    it = jnp.minimum(state.it, sizes.shape[0] - 1)
    side = jax.lax.dynamic_index_in_dim(sizes, it, keepdims=False)
    room = jnp.stack([height - side, width - side]).astype(jnp.float32)
    draw = jax.lax.dynamic_index_in_dim(uniforms, it, keepdims=False)     # [B, 2]
    corner = jnp.floor(draw * room[None, :]).astype(jnp.int32)
    top, left = corner[:, 0], corner[:, 1]
    rows = jnp.arange(height)[None, :]
    cols = jnp.arange(width)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)     # [B, H]
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)   # [B, W]
    window = (in_rows[:, :, None] & in_cols[:, None, :])[..., None]     # [B, H, W, 1]
    channel_signs = jax.lax.dynamic_index_in_dim(signs, it, keepdims=False)
    channel_signs = channel_signs.astype(jnp.float32)[:, None, None, :]  # [B, 1, 1, C]
    eps_b = per_example(eps, x0)
    x_new = state.x_best + jnp.where(window, 2.0 * eps_b * channel_signs, 0.0)
    x_new = jnp.clip(jnp.clip(x_new, x0 - eps_b, x0 + eps_b), 0.0, 1.0)

    margin, value = margin_and_loss(logits_fn, labels, x_new, loss_key)
    active = state.margin > 0.0
    lower = value < state.loss
    accept = active & (lower | (margin <= 0.0))
    return barrier(SquareState(
        x_best=bwhere(accept, x_new, state.x_best),
        margin=jnp.where(accept, margin, state.margin),
        loss=jnp.where(active & lower, value, state.loss),
        queries=state.queries + active.astype(jnp.int32), it=state.it + 1, key=key))

  return step


class SquareResult(NamedTuple):
  adversarial: jax.Array  # [B, H, W, C] best point found
  robust: jax.Array       # [B] bool: margin still > 0
  queries: jax.Array      # [B] int32


def square_attack(logits_fn: Callable, images: jax.Array, labels: jax.Array, key: jax.Array, *,
                  eps, norm: str = "linf", n_queries: int = 5000, p_init: float = 0.8,
                  restarts: int = 1, rescale_schedule: bool = False, loss: str = "margin",
                  stochastic: bool = False, valid: jax.Array | None = None,
                  driver: str = "auto", chunk: int = 20,
                  check_every: int = 100) -> SquareResult:
  """Square Attack with per-example results; stops once no valid example is left."""
  if norm != "linf":
    raise NotImplementedError(f"Square is implemented for norm='linf' only, got {norm!r}")
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  if images.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
  if labels.shape != images.shape[:1]:
    raise ValueError(f"labels shape {labels.shape} does not match batch {images.shape[0]}")
  logits_fn = driver_lib.as_partial(logits_fn)
  eps = jnp.asarray(eps, jnp.float32)
  sizes = jnp.asarray(square_sizes(images.shape[1], images.shape[2], n_queries, p_init,
                                   rescale_schedule))
  init = _init_rule(loss, stochastic)
  done = lambda s: nothing_left(s.margin > 0.0, valid)

  best = None
  for restart in range(restarts):
    if best is not None and nothing_left(best.robust, valid):
      break
    init_key, draw_key = jax.random.split(jax.random.fold_in(key, restart))
    state = init(logits_fn, images, labels, eps, init_key)
    if not done(state):
      uniforms, signs = _draw(draw_key, n_queries, images.shape[0], images.shape[-1])
      step = Partial(_step_rule(loss, stochastic), logits_fn, images, labels, eps, sizes,
                     uniforms, signs)
      state = run_steps(step, state, n_queries, driver=driver, chunk=chunk, done=done,
                               check_every=check_every)
    result = SquareResult(state.x_best, state.margin > 0.0, state.queries)
    if best is None:
      best = result
    else:
      newly = best.robust & ~result.robust
      best = SquareResult(bwhere(newly, result.adversarial, best.adversarial),
                          best.robust & result.robust, best.queries + result.queries)
  return SquareResult(jax.lax.stop_gradient(best.adversarial), best.robust, best.queries)


def square(logits_fn: Callable, images: jax.Array, labels: jax.Array, key: jax.Array, *,
           eps, norm: str = "linf", n_queries: int = 5000, p_init: float = 0.8,
           restarts: int = 1, rescale_schedule: bool = False, loss: str = "margin",
           stochastic: bool = False, driver: str = "auto", chunk: int = 20) -> jax.Array:
  """Square Attack (L-inf). Stable public entry point.

  Args:
    logits_fn: ``images [B,H,W,C] -> logits [B,K]`` (``(images, key)`` if ``stochastic``);
      only its outputs are used (no gradients).
    images: ``[B, H, W, C]`` float32 in [0, 1]; labels ``[B]`` int; eps scalar or ``[B]``.
    n_queries: queries per restart (AutoAttack: 5000); p_init: initial square fraction.
  Returns:
    ``[B, H, W, C]`` best point per example (misclassified where the attack succeeded),
    inside the eps-ball and [0, 1].
  """
  return square_attack(logits_fn, images, labels, key, eps=eps, norm=norm, n_queries=n_queries,
                       p_init=p_init, restarts=restarts, rescale_schedule=rescale_schedule,
                       loss=loss, stochastic=stochastic, driver=driver,
                       chunk=chunk).adversarial
