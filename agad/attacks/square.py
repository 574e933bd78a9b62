"""Square Attack (Andriushchenko et al., ECCV 2020), L-inf and L2, score-based black box.

Minimises the margin ``z_y - max_{j != y} z_j`` (or ``-CE``) with random search, per
example. L-inf:

  start:  x = clip(x0 + eps * s),  s in {-1, +1}, one sign per (column, channel)
          (vertical stripes)
  query:  pick a square of side h_q = max(round(sqrt(p_q * H * W)), 1) (at most min(H, W))
          at a random corner, set it to ``x + 2 eps * s_c`` (one random sign per channel),
          project onto the eps-ball and [0, 1]; keep the new point if its loss is lower
          or it is misclassified. Examples with margin <= 0 stop.
  p_q:    p_init, halved after queries 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000
          (query counts rescaled to a 10000-query budget only if ``rescale_schedule``;
          AutoAttack does not rescale).

L2 (``delta = x - x0``; every norm below is per example, the window norms per channel):

  start:  a 5 x 5 grid of tiles of side ``s = H // 5`` (offset ``(H - 5 s) // 2``), each
          ``meta_pseudo_gaussian_pert(s)`` (maybe transposed) times one random sign per
          channel; ``x = clip(x0 + eps * delta / ||delta||_2, 0, 1)``
  query:  side ``s = max(round(sqrt(p_q * H * W)), 3)``, made odd, at most min(H, W); two
          random windows W1, W2 of side s. In W1 the new perturbation is
          ``pert(s) * sign_c + delta|W1 / ||delta|W1||``, rescaled per channel to norm
          ``sqrt(max(eps^2 - ||delta||^2, 0) / C + ||delta|W1∪W2||^2)``; W2 is zeroed
          (W1 wins where they overlap); then ``x = clip(x0 + eps * delta / ||delta||, 0, 1)``.
          Same accept rule and p schedule as L-inf.

Constants and the accept rule follow fra31/auto-attack ``square.py`` (including its
corner draw ``floor(U * (H - s))``, which never uses the last position). Unlike the
reference, which draws one square position and one channel sign per query for the whole
batch, each example draws its own (as in the original Square Attack code), so a result
does not depend on which other examples share the batch (or on padding rows); for L2 this
includes the random transposes of ``pert(s)`` (the reference draws one per call of its
``eta``). For images smaller than 5 x 5 (where the reference's L2 start divides by
``H // 5 = 0``) the start uses tiles of side 1; tiles that cross the image border are
cropped (the reference fails on them unless the crossing side is 1).

The p schedule, the square sides and the L2 patterns (host-side numpy tables) live in
``agad.attacks.square_patterns``.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from agad.attacks import driver as driver_lib
from agad.attacks import losses
from agad.attacks.iterative import per_example
from agad.attacks.batching import (
  barrier,
  batch_key,
  bwhere,
  call_logits,
  count_trace,
  example_keys,
  fold_in_each,
  lp_norm,
  normalize,
  nothing_left,
  rademacher_each,
  run_steps,
  split_each,
  uniform_each,
)

# meta_pseudo_gaussian_pert and square_p are re-exported (tests, tools/parity_autoattack.py).
from agad.attacks.square_patterns import _l2_patterns, l2_start_tiles, square_sizes

NORMS = ("linf", "l2")
SQUARE_LOSSES = ("margin", "ce")


class SquareState(NamedTuple):
  x_best: jax.Array  # [B, H, W, C]
  margin: jax.Array  # [B] margin of x_best (<= 0: misclassified)
  loss: jax.Array  # [B] loss of x_best (the accept criterion)
  queries: jax.Array  # [B] int32 queries used
  it: jax.Array  # [] int32 query index
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
def _init_rule(loss: str, stochastic: bool, norm: str = "linf") -> Callable:
  margin_and_loss = _margin_and_loss_rule(loss, stochastic)

  def init(logits_fn, x0, labels, eps, keys) -> SquareState:
    # keys [B]: row b's start comes from keys[b] alone.
    stripe_keys, loss_keys, rest_keys = split_each(example_keys(keys, x0.shape[0]), 3)
    loss_key, key = batch_key(loss_keys), batch_key(rest_keys)  # randomised models only
    batch, height, width, channels = x0.shape
    if norm == "linf":
      signs = rademacher_each(stripe_keys, (1, width, channels))
      x = jnp.clip(x0 + per_example(eps, x0) * signs, 0.0, 1.0)
    else:
      tiles, plain, flipped = (jnp.asarray(a) for a in l2_start_tiles(height, width))
      sign_keys, flip_keys = split_each(stripe_keys)
      signs = rademacher_each(sign_keys, (tiles.shape[0], channels))
      flip = (uniform_each(flip_keys, (tiles.shape[0],)) < 0.5).astype(jnp.float32)
      delta = jnp.einsum(
        "thw,btc->bhwc", tiles * plain, signs * (1.0 - flip[..., None])
      ) + jnp.einsum("thw,btc->bhwc", tiles * flipped, signs * flip[..., None])
      x = jnp.clip(x0 + per_example(eps, x0) * normalize(delta, "l2"), 0.0, 1.0)
    margin, value = margin_and_loss(logits_fn, labels, x, loss_key)
    return SquareState(
      x_best=x,
      margin=margin,
      loss=value,
      queries=jnp.ones((batch,), jnp.int32),
      it=jnp.zeros((), jnp.int32),
      key=key,
    )

  return jax.jit(init)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _draw_each(keys: jax.Array, n_queries: int, n_uniforms: int, channels: int):
  """All random choices of a run, drawn at once (unrolled random-number ops compile
  slowly), row b from ``keys[b]`` alone.

  Returns uniforms ``[n_queries, B, n_uniforms]`` float32 (L-inf: the corner, 2; L2: two
  corners, then the pattern's transpose, taken when above 0.5, 5) and channel signs
  ``[n_queries, B, C]`` int8 (about ``n_queries * B * (4 n_uniforms + C)`` bytes).
  """
  corner_keys, sign_keys = split_each(keys)
  uniforms = uniform_each(corner_keys, (n_queries, n_uniforms))
  signs = rademacher_each(sign_keys, (n_queries, channels), jnp.int8)
  return jnp.swapaxes(uniforms, 0, 1), jnp.swapaxes(signs, 0, 1)


def _draw(keys: jax.Array, n_queries: int, channels: int):
  return _draw_each(keys, n_queries, 2, channels)


def _draw_l2(keys: jax.Array, n_queries: int, channels: int):
  return _draw_each(keys, n_queries, 5, channels)


def _accept(state: SquareState, x_new, margin, value, key) -> SquareState:
  """The reference's rule: keep a lower loss or a misclassified point; stop at margin <= 0."""
  active = state.margin > 0.0
  lower = value < state.loss
  accept = active & (lower | (margin <= 0.0))
  return barrier(
    SquareState(
      x_best=bwhere(accept, x_new, state.x_best),
      margin=jnp.where(accept, margin, state.margin),
      loss=jnp.where(active & lower, value, state.loss),
      queries=state.queries + active.astype(jnp.int32),
      it=state.it + 1,
      key=key,
    )
  )


def _window(top: jax.Array, left: jax.Array, side: jax.Array, height: int, width: int) -> jax.Array:
  """``[B, H, W, 1]`` bool: the ``side x side`` square at ``(top, left)`` ``[B]``."""
  rows = jnp.arange(height)[None, :]
  cols = jnp.arange(width)[None, :]
  in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)  # [B, H]
  in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)  # [B, W]
  return (in_rows[:, :, None] & in_cols[:, None, :])[..., None]


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
    draw = jax.lax.dynamic_index_in_dim(uniforms, it, keepdims=False)  # [B, 2]
    corner = jnp.floor(draw * room[None, :]).astype(jnp.int32)
    window = _window(corner[:, 0], corner[:, 1], side, height, width)  # [B, H, W, 1]
    channel_signs = jax.lax.dynamic_index_in_dim(signs, it, keepdims=False)
    channel_signs = channel_signs.astype(jnp.float32)[:, None, None, :]  # [B, 1, 1, C]
    eps_b = per_example(eps, x0)
    x_new = state.x_best + jnp.where(window, 2.0 * eps_b * channel_signs, 0.0)
    x_new = jnp.clip(jnp.clip(x_new, x0 - eps_b, x0 + eps_b), 0.0, 1.0)

    margin, value = margin_and_loss(logits_fn, labels, x_new, loss_key)
    return _accept(state, x_new, margin, value, key)

  return step


@functools.lru_cache(maxsize=None)
def _step_rule_l2(loss: str, stochastic: bool) -> Callable:
  margin_and_loss = _margin_and_loss_rule(loss, stochastic)

  def step(
    logits_fn, x0, labels, eps, sizes, pattern_index, patterns, uniforms, signs, state: SquareState
  ) -> SquareState:
    count_trace("square-l2", state.x_best)
    batch, height, width, channels = x0.shape
    key, loss_key = jax.random.split(state.key) if stochastic else (state.key, state.key)
    it = jnp.minimum(state.it, sizes.shape[0] - 1)
    side = jax.lax.dynamic_index_in_dim(sizes, it, keepdims=False)
    pattern = jax.lax.dynamic_index_in_dim(
      patterns, jax.lax.dynamic_index_in_dim(pattern_index, it, keepdims=False), keepdims=False
    )  # [S, S], zero-padded
    draw = jax.lax.dynamic_index_in_dim(uniforms, it, keepdims=False)  # [B, 5]
    room = jnp.stack([height - side, width - side] * 2).astype(jnp.float32)
    corner = jnp.floor(draw[:, :4] * room[None, :]).astype(jnp.int32)
    top, left = corner[:, 0], corner[:, 1]
    window = _window(top, left, side, height, width)  # W1, gets new mass
    cleared = _window(corner[:, 2], corner[:, 3], side, height, width)  # W2, zeroed

    delta = state.x_best - x0
    sq = jnp.square(delta)
    window_sum = lambda v, m: jnp.sum(jnp.where(m, v, 0.0), axis=(1, 2))  # [B, C]
    norm_window = jnp.sqrt(window_sum(sq, window))
    norm_union = jnp.sqrt(window_sum(sq, window | cleared))
    norm_image = lp_norm(delta, "l2")

    # pert(s) (or its transpose) at (top, left): placed[b, i, j] = P[i - top, j - left].
    flip = (draw[:, 4] > 0.5)[:, None, None]
    oriented = jnp.where(flip, pattern.T[None], pattern[None])  # [B, S, S]
    span = jnp.arange(pattern.shape[0])
    rows = (jnp.arange(height)[None, :, None] - top[:, None, None]) == span  # [B, H, S]
    cols = (jnp.arange(width)[None, :, None] - left[:, None, None]) == span  # [B, W, S]
    placed = jnp.einsum(
      "bik,bkl,bjl->bij", rows.astype(jnp.float32), oriented, cols.astype(jnp.float32)
    )
    channel_signs = jax.lax.dynamic_index_in_dim(signs, it, keepdims=False).astype(jnp.float32)
    fresh = placed[..., None] * channel_signs[:, None, None, :]
    fresh = fresh + jnp.where(window, delta, 0.0) / (1e-12 + norm_window[:, None, None, :])
    norm_fresh = jnp.sqrt(window_sum(jnp.square(fresh), window))
    eps_vec = jnp.broadcast_to(eps, (batch,))
    target = jnp.sqrt(
      jnp.maximum(jnp.square(eps_vec) - jnp.square(norm_image), 0.0)[:, None] / channels
      + jnp.square(norm_union)
    )  # [B, C]
    fresh = fresh / (1e-12 + norm_fresh[:, None, None, :]) * target[:, None, None, :]
    delta = jnp.where(window, fresh, jnp.where(cleared, 0.0, delta))
    x_new = jnp.clip(x0 + per_example(eps, x0) * normalize(delta, "l2"), 0.0, 1.0)

    margin, value = margin_and_loss(logits_fn, labels, x_new, loss_key)
    return _accept(state, x_new, margin, value, key)

  return step


class SquareResult(NamedTuple):
  adversarial: jax.Array  # [B, H, W, C] best point found
  robust: jax.Array  # [B] bool: margin still > 0
  queries: jax.Array  # [B] int32


def _report_progress(progress, offset, total, valid, completed, state) -> None:
  alive = state.margin > 0.0 if valid is None else (state.margin > 0.0) & valid
  progress(offset + completed, total, int(jnp.sum(alive)))


def square_attack(
  logits_fn: Callable,
  images: jax.Array,
  labels: jax.Array,
  key: jax.Array,
  *,
  eps,
  norm: str = "linf",
  n_queries: int = 5000,
  p_init: float = 0.8,
  restarts: int = 1,
  rescale_schedule: bool = False,
  loss: str = "margin",
  stochastic: bool = False,
  valid: jax.Array | None = None,
  driver: str = "auto",
  chunk: int = 20,
  check_every: int = 100,
  progress: Callable[[int, int, int], None] | None = None,
) -> SquareResult:
  """Square Attack with per-example results; stops once no valid example is left.

  ``key``: one key or ``[B]`` per-example keys (``agad.attacks.batching.example_keys``);
  an example's start, squares and signs come from its key alone. ``progress(queries,
  total, robust)``, if given, is called on the host after each compiled block of queries
  with the queries run so far (over all restarts), ``restarts * n_queries`` and the number
  of valid examples still robust in the current restart; it never changes a result.
  """
  if norm not in NORMS:
    raise ValueError(f"norm {norm!r} is not one of {NORMS}")
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  if images.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
  if labels.shape != images.shape[:1]:
    raise ValueError(f"labels shape {labels.shape} does not match batch {images.shape[0]}")
  logits_fn = driver_lib.as_partial(logits_fn)
  eps = jnp.asarray(eps, jnp.float32)
  sizes = square_sizes(images.shape[1], images.shape[2], n_queries, p_init, rescale_schedule, norm)
  if norm == "l2":
    patterns, pattern_index = (jnp.asarray(a) for a in _l2_patterns(sizes))
  sizes = jnp.asarray(sizes)
  init = _init_rule(loss, stochastic, norm)
  done = lambda s: nothing_left(s.margin > 0.0, valid)
  keys = example_keys(key, images.shape[0])

  best = None
  for restart in range(restarts):
    if best is not None and nothing_left(best.robust, valid):
      break
    init_keys, draw_keys = split_each(fold_in_each(keys, restart))
    state = init(logits_fn, images, labels, eps, init_keys)
    if not done(state):
      if norm == "linf":
        uniforms, signs = _draw(draw_keys, n_queries, images.shape[-1])
        step = Partial(
          _step_rule(loss, stochastic), logits_fn, images, labels, eps, sizes, uniforms, signs
        )
      else:
        uniforms, signs = _draw_l2(draw_keys, n_queries, images.shape[-1])
        step = Partial(
          _step_rule_l2(loss, stochastic),
          logits_fn,
          images,
          labels,
          eps,
          sizes,
          pattern_index,
          patterns,
          uniforms,
          signs,
        )
      on_block = None
      if progress is not None:
        on_block = functools.partial(
          _report_progress, progress, restart * n_queries, restarts * n_queries, valid
        )
      state = run_steps(
        step,
        state,
        n_queries,
        driver=driver,
        chunk=chunk,
        done=done,
        check_every=check_every,
        on_block=on_block,
      )
    result = SquareResult(state.x_best, state.margin > 0.0, state.queries)
    if best is None:
      best = result
    else:
      newly = best.robust & ~result.robust
      best = SquareResult(
        bwhere(newly, result.adversarial, best.adversarial),
        best.robust & result.robust,
        best.queries + result.queries,
      )
  return SquareResult(jax.lax.stop_gradient(best.adversarial), best.robust, best.queries)


def square(
  logits_fn: Callable,
  images: jax.Array,
  labels: jax.Array,
  key: jax.Array,
  *,
  eps,
  norm: str = "linf",
  n_queries: int = 5000,
  p_init: float = 0.8,
  restarts: int = 1,
  rescale_schedule: bool = False,
  loss: str = "margin",
  stochastic: bool = False,
  driver: str = "auto",
  chunk: int = 20,
) -> jax.Array:
  """Square Attack (L-inf or L2). Stable public entry point.

  Args:
    logits_fn: ``images [B,H,W,C] -> logits [B,K]`` (``(images, key)`` if ``stochastic``);
      only its outputs are used (no gradients).
    images: ``[B, H, W, C]`` float32 in [0, 1]; labels ``[B]`` int; eps scalar or ``[B]``.
    norm: ``"linf"`` or ``"l2"``.
    n_queries: queries per restart (AutoAttack: 5000); p_init: initial square fraction.
  Returns:
    ``[B, H, W, C]`` best point per example (misclassified where the attack succeeded),
    inside the eps-ball and [0, 1].
  """
  return square_attack(
    logits_fn,
    images,
    labels,
    key,
    eps=eps,
    norm=norm,
    n_queries=n_queries,
    p_init=p_init,
    restarts=restarts,
    rescale_schedule=rescale_schedule,
    loss=loss,
    stochastic=stochastic,
    driver=driver,
    chunk=chunk,
  ).adversarial
