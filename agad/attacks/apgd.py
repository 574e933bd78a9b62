"""Auto-PGD (APGD, Croce & Hein, ICML 2020, Alg. 1), L-inf and L2, CE / DLR / targeted DLR.

Per example, with ``P`` the projection onto ``{||x - x0|| <= eps} ∩ [0, 1]^d`` and
``f`` the loss being maximised:

  x(0)   = clip(x0 + eps * u / ||u||),  u ~ U[-1, 1]^d (L-inf) or N(0, I) (L2)
  z(k+1) = P(x(k) + eta(k) * s(grad f(x(k))))          s = sign (L-inf), g/||g||_2 (L2)
  x(k+1) = P(x(k) + a (z(k+1) - x(k)) + (1 - a)(x(k) - x(k-1))),  a = 1 at k = 0 else 0.75
  eta(0) = 2 eps.

At every checkpoint (``apgd_checkpoints``) an example halves its step size and restarts
from its best-loss point if (1) its loss went up from one iteration to the next in at
most ``rho`` of the window's iterations, or (2) its step size was not halved at the last
checkpoint and its best loss has not improved since. The attack keeps the best-loss
point and the latest misclassified iterate.

Semantics follow the reference code (fra31/auto-attack ``autopgd_base.py``), including
its integer checkpoint rule (window ``max(int(0.22 N), 1)``, shrinking by
``max(int(0.03 N), 1)`` down to ``max(int(0.06 N), 1)``) and its first-window quirk: the
first iteration's loss is compared with 0 (an unfilled row of its loss history), not with
the loss at the start point. All state is per example and fixed-shape; checkpoint logic is
data-driven from counters in the state, so one compiled chunk of steps serves every
iteration and every ``N``.

The host loop over jitted chunks, the early exit and the per-example helpers it shares
with FAB and Square live in ``agad.attacks.batching``.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

# Names, not submodules, are imported from agad.attacks: once the package re-exports the
# functions apgd, fab, square and autoattack, its attributes of those names are the
# functions, not these modules.
from agad.attacks import driver as driver_lib
from agad.attacks.iterative import per_example, project
from agad.attacks import losses
from agad.attacks.dlr import dlr, dlr_targeted, ranked_targets
from agad.attacks.batching import (
  NORMS,
  barrier,
  batch_key,
  bwhere,
  call_logits,
  count_trace,
  example_keys,
  fold_in_each,
  normal_each,
  normalize,
  nothing_left,
  run_steps,
  split_each,
  uniform_each,
)

APGD_LOSSES = ("ce", "dlr", "dlr-targeted", "ce-targeted")
TARGETED_LOSSES = ("dlr-targeted", "ce-targeted")

# ------------------------------------------------------------------------- checkpoints


def apgd_schedule(n_iter: int) -> tuple[int, int, int]:
  """``(first window, window decrement, minimum window)`` exactly as the reference."""
  return (max(int(0.22 * n_iter), 1), max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1))


def apgd_checkpoints(n_iter: int) -> list[int]:
  """Iteration counts after which APGD checks its step size, preceded by 0.

  The reference checks after ``k`` more iterations, then shrinks ``k`` by
  ``max(int(0.03 N), 1)`` down to ``max(int(0.06 N), 1)``; for ``N = 100`` this gives
  ``[0, 22, 41, 57, 70, 80, 87, 93, 99]``, i.e. ``ceil(p_j N)`` for the paper's
  ``p_j``. For other ``N`` the integer rule and the paper's formula can differ.
  """
  first, decrement, minimum = apgd_schedule(n_iter)
  points, position, window = [0], 0, first
  while position + window <= n_iter:
    position += window
    points.append(position)
    window = max(window - decrement, minimum)
  return points


# ------------------------------------------------------------------------------- state


class APGDState(NamedTuple):
  x: jax.Array  # [B, ...] current iterate x(k)
  x_prev: jax.Array  # [B, ...] iterate before it (momentum term)
  grad: jax.Array  # [B, ...] gradient used for the next step
  loss_prev: jax.Array  # [B] loss of the last iterate (0 before the first step)
  x_best: jax.Array  # [B, ...] highest-loss point so far
  grad_best: jax.Array  # [B, ...] its gradient
  loss_best: jax.Array  # [B]
  x_adv: jax.Array  # [B, ...] latest misclassified iterate (start point if none)
  robust: jax.Array  # [B] bool: no misclassified iterate yet
  step_size: jax.Array  # [B]
  n_increase: jax.Array  # [B] int32: loss increases in the current window
  loss_best_last: jax.Array  # [B] best loss at the last checkpoint
  reduced_last: jax.Array  # [B] bool: step halved at the last checkpoint
  counter: jax.Array  # [] int32: iterations since the last checkpoint
  window: jax.Array  # [] int32: length of the current window
  it: jax.Array  # [] int32: iterations done
  key: jax.Array  # PRNG key (randomised models, EOT)


@functools.lru_cache(maxsize=None)
def _loss_rule(loss: str) -> Callable:
  """``(logits, labels, targets) -> [B]`` for a named APGD loss (maximised)."""
  if loss == "ce":
    return lambda logits, labels, targets: losses.cross_entropy(logits, labels)
  if loss == "dlr":
    return lambda logits, labels, targets: dlr(logits, labels)
  if loss == "dlr-targeted":
    return dlr_targeted
  if loss == "ce-targeted":
    return lambda logits, labels, targets: -losses.cross_entropy(logits, targets)
  raise ValueError(f"loss {loss!r} is not one of {APGD_LOSSES}")


@functools.lru_cache(maxsize=None)
def _value_and_grad_rule(loss: str, stochastic: bool, eot_iter: int) -> Callable:
  """``(logits_fn, labels, targets, x, key) -> (loss [B], logits, grad)``.

  With ``eot_iter > 1`` the gradient is the mean over ``eot_iter`` draws of the model's
  randomness; loss and logits come from the last draw, as in the reference.
  """
  per_example_loss = _loss_rule(loss)

  def total(logits_fn, labels, targets, x, key):
    logits = call_logits(logits_fn, x, key, stochastic)
    value = per_example_loss(logits, labels, targets)
    return jnp.sum(value), (value, logits)

  grad_fn = jax.grad(total, argnums=3, has_aux=True)

  def fn(logits_fn, labels, targets, x, key):
    grad_sum = jnp.zeros_like(x)
    value = logits = None
    for _ in range(eot_iter):
      sub = None
      if stochastic:
        key, sub = jax.random.split(key)
      grad, (value, logits) = grad_fn(logits_fn, labels, targets, x, sub)
      grad_sum = grad_sum + grad
    return value, logits, grad_sum / eot_iter

  return fn


def _correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.argmax(logits, axis=-1) == labels


@functools.lru_cache(maxsize=None)
def _init_rule(norm: str, loss: str, stochastic: bool, eot_iter: int) -> Callable:
  value_and_grad = _value_and_grad_rule(loss, stochastic, eot_iter)

  def init(logits_fn, x0, labels, targets, eps, first_window, keys, x_init=None) -> APGDState:
    # keys [B]: the start point of row b comes from keys[b] alone.
    start_keys, grad_keys, rest_keys = split_each(example_keys(keys, x0.shape[0]), 3)
    eps_b = per_example(eps, x0)
    if x_init is not None:
      x = jnp.clip(x_init, 0.0, 1.0)
    else:
      if norm == "linf":
        u = uniform_each(start_keys, x0.shape[1:], -1.0, 1.0, x0.dtype)
      else:
        u = normal_each(start_keys, x0.shape[1:], x0.dtype)
      x = jnp.clip(x0 + eps_b * normalize(u, norm), 0.0, 1.0)
    key = batch_key(rest_keys)  # randomised models only (EOT draws)
    value, logits, grad = value_and_grad(logits_fn, labels, targets, x, batch_key(grad_keys))
    batch = x0.shape[0]
    return APGDState(
      x=x,
      x_prev=x,
      grad=grad,
      loss_prev=jnp.zeros((batch,), jnp.float32),
      x_best=x,
      grad_best=grad,
      loss_best=value,
      x_adv=x,
      robust=_correct(logits, labels),
      step_size=jnp.broadcast_to(2.0 * jnp.asarray(eps, jnp.float32), (batch,)),
      n_increase=jnp.zeros((batch,), jnp.int32),
      loss_best_last=value,
      reduced_last=jnp.ones((batch,), bool),
      counter=jnp.zeros((), jnp.int32),
      window=jnp.asarray(first_window, jnp.int32),
      it=jnp.zeros((), jnp.int32),
      key=key,
    )

  return jax.jit(init)


@functools.lru_cache(maxsize=None)
def _step_rule(norm: str, loss: str, stochastic: bool, eot_iter: int) -> Callable:
  value_and_grad = _value_and_grad_rule(loss, stochastic, eot_iter)
  tag = f"apgd-{loss}"

  def step(
    logits_fn, x0, labels, targets, eps, rho, decrement, minimum, state: APGDState
  ) -> APGDState:
    count_trace(tag, state.x)
    size = per_example(state.step_size, x0)
    if norm == "linf":
      z = state.x + size * jnp.sign(state.grad)
    else:
      z = state.x + size * normalize(state.grad, "l2")
    z = project(z, x0, eps, norm)
    a = jnp.where(state.it > 0, 0.75, 1.0)
    x_new = project(
      state.x + a * (z - state.x) + (1.0 - a) * (state.x - state.x_prev), x0, eps, norm
    )

    key, sub = jax.random.split(state.key) if stochastic else (state.key, state.key)
    value, logits, grad = value_and_grad(logits_fn, labels, targets, x_new, sub)

    correct = _correct(logits, labels)
    x_adv = bwhere(correct, state.x_adv, x_new)
    improved = value > state.loss_best
    x_best = bwhere(improved, x_new, state.x_best)
    grad_best = bwhere(improved, grad, state.grad_best)
    loss_best = jnp.where(improved, value, state.loss_best)

    n_increase = state.n_increase + (value > state.loss_prev).astype(jnp.int32)
    counter = state.counter + 1
    at_check = counter == state.window
    oscillating = n_increase.astype(jnp.float32) <= state.window.astype(jnp.float32) * rho
    stalled = (~state.reduced_last) & (state.loss_best_last >= loss_best)
    reduce = (oscillating | stalled) & at_check

    return barrier(
      APGDState(
        x=bwhere(reduce, x_best, x_new),
        x_prev=state.x,
        grad=bwhere(reduce, grad_best, grad),
        loss_prev=value,
        x_best=x_best,
        grad_best=grad_best,
        loss_best=loss_best,
        x_adv=x_adv,
        robust=state.robust & correct,
        step_size=jnp.where(reduce, 0.5 * state.step_size, state.step_size),
        n_increase=jnp.where(at_check, 0, n_increase),
        loss_best_last=jnp.where(at_check, loss_best, state.loss_best_last),
        reduced_last=jnp.where(at_check, oscillating | stalled, state.reduced_last),
        counter=jnp.where(at_check, 0, counter),
        window=jnp.where(at_check, jnp.maximum(state.window - decrement, minimum), state.window),
        it=state.it + 1,
        key=key,
      )
    )

  return step


# --------------------------------------------------------------------------- public API


class APGDResult(NamedTuple):
  adversarial: jax.Array  # [B, H, W, C]: a misclassified iterate, else the best-loss point
  robust: jax.Array  # [B] bool: no misclassified iterate found
  loss: jax.Array  # [B] best loss reached
  zero_grad: jax.Array  # [B] bool: the gradient at the (first) start point is exactly 0


def _check_inputs(images, labels, norm, loss, targets):
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  if images.ndim < 2:
    raise ValueError(f"images must be [B, ...], got shape {images.shape}")
  if labels.shape != images.shape[:1]:
    raise ValueError(f"labels shape {labels.shape} does not match batch {images.shape[0]}")
  if norm not in NORMS:
    raise ValueError(f"norm {norm!r} is not one of {NORMS}")
  if loss not in APGD_LOSSES:
    raise ValueError(f"loss {loss!r} is not one of {APGD_LOSSES}")
  if loss in TARGETED_LOSSES:
    if targets is None:
      raise ValueError(f"loss {loss!r} needs targets [B]")
    targets = jnp.asarray(targets, jnp.int32)
    if targets.shape != labels.shape:
      raise ValueError(f"targets shape {targets.shape} does not match labels {labels.shape}")
  else:
    targets = jnp.zeros_like(labels)
  return images, labels, targets


def apgd_attack(
  logits_fn: Callable,
  images: jax.Array,
  labels: jax.Array,
  key: jax.Array,
  *,
  eps,
  norm: str = "linf",
  steps: int = 100,
  loss: str = "ce",
  restarts: int = 1,
  rho: float = 0.75,
  targets: jax.Array | None = None,
  eot_iter: int = 1,
  stochastic: bool = False,
  valid: jax.Array | None = None,
  x_init: jax.Array | None = None,
  driver: str = "auto",
  chunk: int | None = None,
) -> APGDResult:
  """APGD returning the adversarial points with per-example robustness and loss.

  ``x_init`` ``[B, ...]`` replaces the random start of the first restart (as the
  reference's ``x_init``; it is only clipped to [0, 1], so keep it inside the ball).
  Restarts after the first attack only the examples still robust (their results replace
  the earlier ones only where they break the example or reach a higher loss).
  ``valid`` ``[B]`` marks padding rows (False) so they do not delay the early exit.
  ``key`` is one PRNG key (row b then uses ``fold_in(key, b)``) or ``[B]`` per-example
  keys (``agad.attacks.batching.example_keys``): an example's start points depend only on
  its key, not on the batch.
  """
  images, labels, targets = _check_inputs(images, labels, norm, loss, targets)
  if steps < 1 or restarts < 1 or eot_iter < 1:
    raise ValueError(f"steps={steps}, restarts={restarts}, eot_iter={eot_iter} must be >= 1")
  logits_fn = driver_lib.as_partial(logits_fn)
  eps = jnp.asarray(eps, jnp.float32)
  first, decrement, minimum = apgd_schedule(steps)
  if chunk is None:
    chunk = 10 if eot_iter == 1 else max(1, 20 // eot_iter)
  init = _init_rule(norm, loss, stochastic, eot_iter)
  step = Partial(
    _step_rule(norm, loss, stochastic, eot_iter),
    logits_fn,
    images,
    labels,
    targets,
    eps,
    jnp.float32(rho),
    jnp.int32(decrement),
    jnp.int32(minimum),
  )
  done = lambda s: nothing_left(s.robust, valid)
  keys = example_keys(key, images.shape[0])

  best = None
  for restart in range(restarts):
    if best is not None and nothing_left(best.robust, valid):
      break
    state = init(
      logits_fn,
      images,
      labels,
      targets,
      eps,
      first,
      fold_in_each(keys, restart),
      x_init if restart == 0 else None,
    )
    if best is None:
      zero_grad = jnp.all(state.grad.reshape(state.grad.shape[0], -1) == 0, axis=-1)
    state = run_steps(step, state, steps, driver=driver, chunk=chunk, done=done)
    adversarial = bwhere(state.robust, state.x_best, state.x_adv)
    result = APGDResult(adversarial, state.robust, state.loss_best, zero_grad)
    if best is None:
      best = result
    else:
      newly_broken = best.robust & ~result.robust
      higher = best.robust & result.robust & (result.loss > best.loss)
      take = newly_broken | higher
      best = APGDResult(
        bwhere(take, result.adversarial, best.adversarial),
        best.robust & result.robust,
        jnp.where(take, result.loss, best.loss),
        zero_grad,
      )
  return best._replace(adversarial=jax.lax.stop_gradient(best.adversarial))


def apgd(
  logits_fn: Callable,
  images: jax.Array,
  labels: jax.Array,
  key: jax.Array,
  *,
  eps,
  norm: str = "linf",
  steps: int = 100,
  loss: str = "ce",
  restarts: int = 1,
  rho: float = 0.75,
  targets: jax.Array | None = None,
  eot_iter: int = 1,
  stochastic: bool = False,
  driver: str = "auto",
  chunk: int | None = None,
) -> jax.Array:
  """APGD (Croce & Hein 2020). Stable public entry point.

  Args:
    logits_fn: ``images [B,H,W,C] float32 in [0,1] -> logits [B,K]`` (``(images, key)``
      if ``stochastic``). Pass a ``jax.tree_util.Partial`` so calls reuse compiled code.
    images: ``[B, H, W, C]`` float32 in [0, 1]; labels: ``[B]`` int true labels.
    key: PRNG key (start point, randomised models).
    eps: scalar or ``[B]``; ``norm``: ``"linf"`` or ``"l2"``.
    steps: iterations per restart (the checkpoint rule scales with it).
    loss: ``"ce"``, ``"dlr"``, ``"dlr-targeted"`` or ``"ce-targeted"`` (the last two need
      ``targets [B]``; success is still measured against ``labels``).
    restarts: random restarts, each only on examples still robust.
    rho: oscillation threshold of the step-size rule.
    eot_iter: gradients averaged per step (expectation over transformation).
  Returns:
    ``[B, H, W, C]``: per example, a misclassified iterate if one was found, else the
    highest-loss point; inside the eps-ball and [0, 1], gradient-stopped.
  """
  return apgd_attack(
    logits_fn,
    images,
    labels,
    key,
    eps=eps,
    norm=norm,
    steps=steps,
    loss=loss,
    restarts=restarts,
    rho=rho,
    targets=targets,
    eot_iter=eot_iter,
    stochastic=stochastic,
    driver=driver,
    chunk=chunk,
  ).adversarial


def apgd_targeted(
  logits_fn: Callable,
  images: jax.Array,
  labels: jax.Array,
  key: jax.Array,
  *,
  eps,
  norm: str = "linf",
  steps: int = 100,
  n_target_classes: int = 9,
  restarts: int = 1,
  rho: float = 0.75,
  stochastic: bool = False,
  driver: str = "auto",
  chunk: int | None = None,
) -> jax.Array:
  """APGD-T: targeted-DLR APGD towards the classes ranked 2..``n_target_classes + 1``.

  Targets come from the clean logits (capped at ``K - 1`` classes); each target runs
  ``steps`` iterations, and only examples not yet broken take a later target's result.
  Returns ``[B, H, W, C]`` (misclassified point if found, else the last target's best).
  """
  images = jnp.asarray(images, jnp.float32)
  logits_fn = driver_lib.as_partial(logits_fn)
  clean = call_logits(logits_fn, images, key, stochastic)
  n_targets = min(n_target_classes, clean.shape[-1] - 1)
  ranked = ranked_targets(clean, n_targets)
  adversarial, robust = None, None
  for j in range(n_targets):
    result = apgd_attack(
      logits_fn,
      images,
      labels,
      jax.random.fold_in(key, j),
      eps=eps,
      norm=norm,
      steps=steps,
      loss="dlr-targeted",
      restarts=restarts,
      rho=rho,
      targets=ranked[:, j],
      stochastic=stochastic,
      driver=driver,
      chunk=chunk,
    )
    if adversarial is None:
      adversarial, robust = result.adversarial, result.robust
    else:
      adversarial = bwhere(robust, result.adversarial, adversarial)
      robust = robust & result.robust
    if nothing_left(robust, None):
      break
  return adversarial
