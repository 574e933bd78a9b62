"""Projected gradient descent (Madry et al. 2018), BIM, MIM and FGSM, L-inf and L2.

An attack is an ``init``/``step`` pair of pure functions plus a driver
(``agad.attacks.driver``):

    state = pgd_init(key, x0, eps=..., norm=..., random_start=...)
    state = pgd_step(loss_fn, x0, eps, step_size, state)   # repeated `steps` times

``loss_fn(x) -> [B]`` (or ``loss_fn(x, key)`` for randomised models) is any per-example
loss the attacker maximises (descends when ``targeted``). ``pgd`` builds it from a
``logits_fn`` and a named loss; ``pgd_general`` takes it directly (TRADES' KL attack,
targeted attacks, adaptive attacks through auxiliary heads).

Update rules (per example, ``g = grad of sum_b loss_b``):
  L-inf: x <- P(x + a * sign(g));  L2: x <- P(x + a * g / ||g||_2)
with ``P`` the projection onto the eps-ball around ``x0`` intersected with [0, 1]^d.

``track_best=True`` (evaluation; off for the training attack, whose cost it would
raise) keeps, per example, the last iterate that was misclassified (for ``targeted``:
classified as the target) as APGD does: an example counts as broken if *any* iterate
was, and that iterate is returned when the final one is not adversarial. The check
reuses the forward pass of the gradient step (``pgd_general`` with a ``success_fn``
spends one extra forward pass per step), and works under every driver.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from agad.attacks import driver as driver_lib
from agad.attacks import losses

NORMS = ("linf", "l2")
RANDOM_STARTS = ("uniform", "normal", "none")


class PGDState(NamedTuple):
  x: jax.Array  # [B, H, W, C] current iterate
  key: jax.Array  # PRNG key for randomised models
  x_best: Any = None  # [B, H, W, C] last adversarial iterate (track_best only)
  broken: Any = None  # [B] bool: some iterate was adversarial (track_best only)


def per_example(value: jax.Array | float, x: jax.Array) -> jax.Array:
  """Scalar or ``[B]`` -> array broadcastable against ``x`` ``[B, ...]``."""
  value = jnp.asarray(value, jnp.float32)
  if value.ndim == 1:
    if value.shape[0] != x.shape[0]:
      raise ValueError(f"per-example eps/step has shape {value.shape}, batch is {x.shape[0]}")
    value = value.reshape((-1,) + (1,) * (x.ndim - 1))
  elif value.ndim != 0:
    raise ValueError(f"eps/step must be a scalar or [B], got shape {value.shape}")
  return value


def _l2_norm(v: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim)), keepdims=True))


def project(x: jax.Array, x0: jax.Array, eps: jax.Array | float, norm: str = "linf") -> jax.Array:
  """Projects ``x`` onto ``{||x - x0|| <= eps} ∩ [0, 1]^d``."""
  eps = per_example(eps, x0)
  delta = x - x0
  if norm == "linf":
    delta = jnp.clip(delta, -eps, eps)
  elif norm == "l2":
    delta = delta * jnp.minimum(1.0, eps / (_l2_norm(delta) + 1e-12))
  else:
    raise ValueError(f"norm {norm!r} is not one of {NORMS}")
  return jnp.clip(x0 + delta, 0.0, 1.0)


def pgd_init(
  key: jax.Array, x0: jax.Array, *, eps, norm: str = "linf", random_start: str = "uniform"
) -> PGDState:
  """Starting point: x0, x0 + U(-eps, eps) (L2: uniform in the ball) or x0 + 0.001 N(0, 1).

  ``key``: one PRNG key (the start is drawn for the whole batch at once, as the training
  attack always has), or ``[B]`` per-example keys: row b's start then comes from
  ``key[b]`` alone, so the result of an example does not depend on the batch size or on
  its neighbours (pass ``fold_in(key, example index)``, see
  ``agad.attacks.batching.example_keys``). ``state.key`` is one key either way.
  """
  if jnp.ndim(key) == 1:
    if key.shape[0] != x0.shape[0]:
      raise ValueError(f"per-example keys have shape {key.shape}, the batch is {x0.shape[0]}")
    parts = jax.vmap(lambda k: jax.random.split(k, 3))(key)
    start_keys, l2_keys = parts[:, 0], parts[:, 1]
    direction_keys = start_keys
    key = jax.random.fold_in(parts[0, 2], x0.shape[0])
    each = lambda fn, keys, shape: jax.vmap(lambda k: fn(k, shape))(keys)
    normal = lambda keys, shape: each(lambda k, s: jax.random.normal(k, s, x0.dtype), keys, shape)
    uniform = lambda keys, shape, lo=0.0, hi=1.0: each(
      lambda k, s: jax.random.uniform(k, s, x0.dtype, lo, hi), keys, shape
    )
    sample_shape = x0.shape[1:]
  else:
    start_key, key = jax.random.split(key)
    k1, k2 = jax.random.split(start_key)
    start_keys, direction_keys, l2_keys = start_key, k1, k2
    normal = lambda k, shape: jax.random.normal(k, (x0.shape[0],) + shape, x0.dtype)
    uniform = lambda k, shape, lo=0.0, hi=1.0: jax.random.uniform(
      k, (x0.shape[0],) + shape, x0.dtype, lo, hi
    )
    sample_shape = x0.shape[1:]
  eps_b = per_example(eps, x0)
  if random_start == "none":
    x = x0
  elif random_start == "normal":
    x = x0 + 0.001 * normal(start_keys, sample_shape)
  elif random_start == "uniform":
    if norm == "linf":
      x = x0 + uniform(start_keys, sample_shape, -1.0, 1.0) * eps_b
    else:
      direction = normal(direction_keys, sample_shape)
      direction = direction / (_l2_norm(direction) + 1e-12)
      dim = x0[0].size
      radius = uniform(l2_keys, (1,) * (x0.ndim - 1)) ** (1.0 / dim)
      x = x0 + direction * radius * eps_b
  else:
    raise ValueError(f"random_start {random_start!r} is not one of {RANDOM_STARTS}")
  if norm not in NORMS:
    raise ValueError(f"norm {norm!r} is not one of {NORMS}")
  # TRADES' 0.001 N(0,1) start is clipped to [0, 1] only (it is far inside the ball).
  return PGDState(
    x=project(x, x0, eps, norm) if random_start != "normal" else jnp.clip(x, 0.0, 1.0), key=key
  )


def _grad_and_best(loss_fn, state, sub, stochastic: bool, track: bool):
  """Gradient of ``sum(loss)`` at ``state.x``; with ``track`` the loss returns
  ``(loss [B], success [B])`` and the best iterate is updated from this forward pass."""
  call = (lambda x: loss_fn(x, sub)) if stochastic else loss_fn
  if not track:
    return jax.grad(lambda x: jnp.sum(call(x)))(state.x), {}

  def total(x):
    value, success = call(x)
    return jnp.sum(value), success

  grad, success = jax.grad(total, has_aux=True)(state.x)
  mask = success.reshape((-1,) + (1,) * (state.x.ndim - 1))
  return grad, {"x_best": jnp.where(mask, state.x, state.x_best), "broken": state.broken | success}


def init_best(state):
  """``state`` (PGDState or MIMState) with ``x_best = x`` and ``broken = False``."""
  return state._replace(x_best=state.x, broken=jnp.zeros(state.x.shape[:1], bool))


@functools.partial(jax.jit, static_argnums=(3,))
def _finish_best(loss_fn, state, key, stochastic: bool) -> jax.Array:
  """The final iterate if it is adversarial or nothing earlier was, else the best one."""
  _, success = loss_fn(state.x, key) if stochastic else loss_fn(state.x)
  keep = (success | ~state.broken).reshape((-1,) + (1,) * (state.x.ndim - 1))
  return jnp.where(keep, state.x, state.x_best)


@functools.lru_cache(maxsize=None)
def _step_rule(norm: str, targeted: bool, stochastic: bool, track: bool = False) -> Callable:
  """The step function for a static configuration (cached so jit caches hit)."""

  def step(loss_fn, x0, eps, step_size, state: PGDState) -> PGDState:
    key, sub = jax.random.split(state.key)
    grad, best = _grad_and_best(loss_fn, state, sub, stochastic, track)
    if targeted:
      grad = -grad
    size = per_example(step_size, x0)
    if norm == "linf":
      x = state.x + size * jnp.sign(grad)
    else:
      x = state.x + size * grad / (_l2_norm(grad) + 1e-12)
    return state._replace(x=project(x, x0, eps, norm), key=key, **best)

  return step


def pgd_step(
  loss_fn,
  x0,
  eps,
  step_size,
  state: PGDState,
  *,
  norm: str = "linf",
  targeted: bool = False,
  stochastic: bool = False,
  track_best: bool = False,
) -> PGDState:
  """One PGD step (see module docstring). With ``track_best`` the loss returns
  ``(loss [B], success [B] bool)`` and ``state`` carries ``x_best``/``broken``
  (see :func:`init_best`)."""
  return _step_rule(norm, targeted, stochastic, track_best)(loss_fn, x0, eps, step_size, state)


def _with_success(loss_fn, success_fn, x, key=None):
  """``(loss_fn(x), success_fn(x))`` (with ``key`` for randomised models)."""
  if key is None:
    return loss_fn(x), success_fn(x)
  return loss_fn(x, key), success_fn(x, key)


def pgd_general(
  loss_fn: Callable,
  images: jax.Array,
  key: jax.Array,
  *,
  eps,
  step_size,
  steps: int,
  norm: str = "linf",
  random_start: str = "uniform",
  targeted: bool = False,
  stochastic: bool = False,
  driver: str = "auto",
  chunk: int = 10,
  success_fn: Callable | None = None,
) -> jax.Array:
  """PGD maximising (or, if ``targeted``, minimising) a per-example ``loss_fn(x) -> [B]``.

  Args:
    loss_fn: ``x [B,H,W,C] -> [B]`` (``(x, key) -> [B]`` if ``stochastic``). For the
      ``"host"`` driver pass a ``jax.tree_util.Partial`` to avoid a recompile per call.
    images: ``[B, H, W, C]`` float32 in [0, 1].
    eps, step_size: scalars or ``[B]``.
    success_fn: optional ``x -> [B] bool`` (``(x, key)`` if ``stochastic``), true where
      ``x`` is adversarial. If given, the last successful iterate per example is kept
      and returned when the final one is not successful (one extra forward pass per
      step). A Partial keeps jit caches warm.
  Returns:
    ``[B, H, W, C]`` adversarial images in the eps-ball and in [0, 1], gradient-stopped.
  """
  loss_fn = driver_lib.as_partial(loss_fn)
  if success_fn is not None:
    loss_fn = Partial(_with_success, loss_fn, driver_lib.as_partial(success_fn))
  return _run_pgd(
    loss_fn,
    images,
    key,
    eps=eps,
    step_size=step_size,
    steps=steps,
    norm=norm,
    random_start=random_start,
    targeted=targeted,
    stochastic=stochastic,
    driver=driver,
    chunk=chunk,
    track=success_fn is not None,
  )


def _run_pgd(
  loss_fn: Partial,
  images,
  key,
  *,
  eps,
  step_size,
  steps,
  norm,
  random_start,
  targeted,
  stochastic,
  driver,
  chunk,
  track: bool,
) -> jax.Array:
  """PGD on ``loss_fn`` (returning ``(loss, success)`` when ``track``)."""
  images = jnp.asarray(images, jnp.float32)
  state = pgd_init(key, images, eps=eps, norm=norm, random_start=random_start)
  if track:
    state = init_best(state)
  step = Partial(
    _step_rule(norm, targeted, stochastic, track),
    loss_fn,
    images,
    jnp.asarray(eps, jnp.float32),
    jnp.asarray(step_size, jnp.float32),
  )
  state = driver_lib.iterate(step, state, steps, driver=driver, chunk=chunk)
  x = _finish_best(loss_fn, state, state.key, stochastic) if track else state.x
  return jax.lax.stop_gradient(x)


@functools.lru_cache(maxsize=None)
def _named_loss(
  loss: Any,
  stochastic: bool,
  kappa: float | None,
  label_smoothing: float,
  success: str | None = None,
) -> Callable:
  """``(logits_fn, labels, probs_ref, x[, key]) -> [B]`` for a loss name or callable;
  with ``success`` (``"untargeted"`` or ``"targeted"``) it returns ``(loss [B],
  adversarial [B] bool)``: prediction != labels (targeted: == labels)."""
  if callable(loss):
    per_example = loss
  elif loss == "ce":
    per_example = functools.partial(losses.cross_entropy, label_smoothing=label_smoothing)
  elif loss == "margin":
    per_example = functools.partial(losses.margin, kappa=kappa)
  elif loss == "kl":
    per_example = None
  else:
    raise ValueError(f"loss {loss!r} is not one of {losses.LOSSES} or a callable")

  def fn(logits_fn, labels, probs_ref, x, key=None):
    logits = logits_fn(x, key) if stochastic else logits_fn(x)
    value = (
      losses.kl_divergence(probs_ref, logits)
      if per_example is None
      else per_example(logits, labels)
    )
    if success is None:
      return value
    hit = jnp.argmax(logits, -1) == labels
    return value, jax.lax.stop_gradient(hit if success == "targeted" else ~hit)

  return fn


def _checked(images, labels) -> tuple[jax.Array, jax.Array]:
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels)
  if images.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
  if labels.shape != images.shape[:1]:
    raise ValueError(f"labels shape {labels.shape} does not match batch {images.shape[0]}")
  return images, labels


def _classifier_loss(
  logits_fn,
  images,
  labels,
  key,
  *,
  loss,
  stochastic,
  kappa,
  label_smoothing,
  success: str | None = None,
) -> Partial:
  """``x -> [B]`` (``(x, key) -> [B]``) for a named loss on a classifier, as a Partial
  (``x -> (loss, adversarial)`` with ``success``, see :func:`_named_loss`)."""
  logits_fn = driver_lib.as_partial(logits_fn)
  probs_ref = None
  if loss == "kl":
    clean = logits_fn(images, key) if stochastic else logits_fn(images)
    probs_ref = jax.lax.stop_gradient(jax.nn.softmax(clean.astype(jnp.float32), axis=-1))
  return Partial(
    _named_loss(loss, stochastic, kappa, label_smoothing, success), logits_fn, labels, probs_ref
  )


def pgd(
  logits_fn: Callable,
  images: jax.Array,
  labels: jax.Array,
  key: jax.Array,
  *,
  eps,
  step_size,
  steps: int,
  norm: str = "linf",
  random_start: str = "uniform",
  loss: str | Callable = "ce",
  targeted: bool = False,
  stochastic: bool = False,
  kappa: float | None = None,
  label_smoothing: float = 0.0,
  driver: str = "auto",
  chunk: int = 10,
  track_best: bool = False,
) -> jax.Array:
  """PGD on a classifier. Stable public entry point.

  Args:
    logits_fn: ``images [B,H,W,C] float32 in [0,1] -> logits [B,K]``; with
      ``stochastic=True`` it is called as ``logits_fn(images, key)`` with a fresh key
      per step. Pass a ``jax.tree_util.Partial`` (e.g. from ``agad.make_logits_fn``) so
      repeated calls reuse compiled code.
    images: ``[B, H, W, C]`` float32 in [0, 1].
    labels: ``[B]`` int true labels (targets when ``targeted``).
    key: PRNG key (random start and randomised models), or ``[B]`` per-example keys:
      each example's random start then depends on its key alone (see ``pgd_init``).
    eps, step_size: scalar or ``[B]`` in [0, 1] pixel units (L-inf) or L2 norm units.
    steps: number of gradient steps.
    norm: ``"linf"`` (sign steps) or ``"l2"`` (normalised gradient steps).
    random_start: ``"uniform"``, ``"normal"`` (0.001 N(0, 1), as TRADES) or ``"none"``.
    loss: ``"ce"``, ``"margin"`` (C&W, clipped at ``kappa`` if given), ``"kl"``
      (``KL(p_clean || p_adv)`` with clean probabilities computed once) or a callable
      ``(logits, labels) -> [B]``.
    targeted: labels are targets and the loss is descended.
    track_best: keep the last misclassified iterate per example (module docstring);
      False for the training attack (unchanged cost), True in evaluation.
  Returns:
    Adversarial images ``[B, H, W, C]``, inside the ball and [0, 1], gradient-stopped.
  """
  images, labels = _checked(images, labels)
  success = ("targeted" if targeted else "untargeted") if track_best else None
  batch_key = jax.random.fold_in(key[0], key.shape[0]) if jnp.ndim(key) == 1 else key
  loss_fn = _classifier_loss(
    logits_fn,
    images,
    labels,
    batch_key,
    loss=loss,
    stochastic=stochastic,
    kappa=kappa,
    label_smoothing=label_smoothing,
    success=success,
  )
  return _run_pgd(
    loss_fn,
    images,
    key,
    eps=eps,
    step_size=step_size,
    steps=steps,
    norm=norm,
    random_start=random_start,
    targeted=targeted,
    stochastic=stochastic,
    driver=driver,
    chunk=chunk,
    track=track_best,
  )


def fgsm(
  logits_fn: Callable,
  images: jax.Array,
  labels: jax.Array,
  key: jax.Array,
  *,
  eps,
  norm: str = "linf",
  loss: str | Callable = "ce",
  **kwargs,
) -> jax.Array:
  """FGSM (Goodfellow et al. 2015): one step of size eps from the clean image."""
  return pgd(
    logits_fn,
    images,
    labels,
    key,
    eps=eps,
    step_size=eps,
    steps=1,
    norm=norm,
    random_start="none",
    loss=loss,
    **kwargs,
  )


def bim(
  logits_fn: Callable,
  images: jax.Array,
  labels: jax.Array,
  key: jax.Array,
  *,
  eps,
  step_size,
  steps: int,
  **kwargs,
) -> jax.Array:
  """BIM / I-FGSM (Kurakin et al. 2017): PGD from the clean image (no random start)."""
  return pgd(
    logits_fn,
    images,
    labels,
    key,
    eps=eps,
    step_size=step_size,
    steps=steps,
    random_start="none",
    **kwargs,
  )


class MIMState(NamedTuple):
  x: jax.Array  # [B, H, W, C] current iterate
  velocity: jax.Array  # [B, H, W, C] accumulated L1-normalised gradient
  key: jax.Array
  x_best: Any = None  # as PGDState (track_best only)
  broken: Any = None


@functools.lru_cache(maxsize=None)
def _mim_rule(norm: str, targeted: bool, stochastic: bool, track: bool = False) -> Callable:
  """MIM step: g <- decay g + grad / ||grad||_1, then a sign (L2: normalised) step on g."""

  def step(loss_fn, x0, eps, step_size, decay, state: MIMState) -> MIMState:
    key, sub = jax.random.split(state.key)
    grad, best = _grad_and_best(loss_fn, state, sub, stochastic, track)
    if targeted:
      grad = -grad
    l1 = jnp.sum(jnp.abs(grad), axis=tuple(range(1, grad.ndim)), keepdims=True)
    velocity = decay * state.velocity + grad / (l1 + 1e-12)
    size = per_example(step_size, x0)
    if norm == "linf":
      x = state.x + size * jnp.sign(velocity)
    else:
      x = state.x + size * velocity / (_l2_norm(velocity) + 1e-12)
    return state._replace(x=project(x, x0, eps, norm), velocity=velocity, key=key, **best)

  return step


def mim(
  logits_fn: Callable,
  images: jax.Array,
  labels: jax.Array,
  key: jax.Array,
  *,
  eps,
  steps: int = 10,
  step_size=None,
  decay: float = 1.0,
  norm: str = "linf",
  loss: str | Callable = "ce",
  targeted: bool = False,
  stochastic: bool = False,
  kappa: float | None = None,
  driver: str = "auto",
  chunk: int = 10,
  track_best: bool = False,
) -> jax.Array:
  """Momentum iterative method (Dong et al. 2018), from the clean image.

  ``step_size`` defaults to ``eps / steps`` and ``decay`` (mu) to 1.0, the paper's
  setting. Other arguments (``track_best`` included) as :func:`pgd`.
  """
  if norm not in NORMS:
    raise ValueError(f"norm {norm!r} is not one of {NORMS}")
  images, labels = _checked(images, labels)
  success = ("targeted" if targeted else "untargeted") if track_best else None
  batch_key = jax.random.fold_in(key[0], key.shape[0]) if jnp.ndim(key) == 1 else key
  loss_fn = _classifier_loss(
    logits_fn,
    images,
    labels,
    batch_key,
    loss=loss,
    stochastic=stochastic,
    kappa=kappa,
    label_smoothing=0.0,
    success=success,
  )
  eps = jnp.asarray(eps, jnp.float32)
  size = eps / steps if step_size is None else jnp.asarray(step_size, jnp.float32)
  state = MIMState(x=images, velocity=jnp.zeros_like(images), key=key)
  if track_best:
    state = init_best(state)
  step = Partial(
    _mim_rule(norm, targeted, stochastic, track_best),
    loss_fn,
    images,
    eps,
    size,
    jnp.asarray(decay, jnp.float32),
  )
  state = driver_lib.iterate(step, state, steps, driver=driver, chunk=chunk)
  x = _finish_best(loss_fn, state, state.key, stochastic) if track_best else state.x
  return jax.lax.stop_gradient(x)
