"""Adversarial weight perturbation (Wu et al. 2020) as a transform ``Objective -> Objective``.

As coded in csdongxian/AWP (``utils_awp.py``, ``AT_AWP/train_cifar10.py``,
``trades_AWP/train_trades_cifar.py``), per training step:

1. ``generate`` is the inner objective's, unchanged: the adversarial batch is made once,
   at the unperturbed weights ``w``, and reused by the proxy and the update.
2. Proxy: a copy of ``w`` takes one plain SGD step (lr ``proxy_lr``, no momentum, no
   weight decay) on ``-L_inner(w; x, x')`` in train mode. Its BN running statistics are
   thrown away (the official proxy is a separate network re-loaded from the model each
   step), so the pass uses batch statistics and leaves the model's untouched.
3. ``diff = w_proxy - w``; for every parameter tensor with ``ndim >= 2`` (conv and dense
   kernels, auxiliary heads included; biases and BN scales are skipped)
   ``v = gamma * ||w||_F / (||diff||_F + 1e-20) * diff`` (per tensor, Frobenius norms).
4. The update's gradient is taken at ``w + v``: the wrapped loss returns
   ``L_inner(w + stop_gradient(v))``, whose gradient w.r.t. ``w`` is the inner gradient at
   ``w + v``; the optimizer applies it to ``w`` (so the perturbation is "restored"
   automatically). BN running statistics come from the pass at ``w + v``, as the official
   ``model(x_adv)`` under the perturbed weights.

Warm-up: ``v = 0`` while ``step < warmup_steps`` (``jnp.where``, one compiled program).
The proxy objective is the inner objective's own loss (AT-AWP: ``-CE(x')``; TRADES-AWP:
``-(CE(x) + beta KL)``), which is what both official trainers use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from agad.objectives import base, defaults

# Fields and their comments stay aligned (the defaults are their own documentation).
# fmt: off
DEFAULTS = ml_collections.ConfigDict()
DEFAULTS.gamma = 0.005                 # relative weight-perturbation size per >=2-D tensor. TRADES-AWP: 0.005; AT-AWP: 0.01.
DEFAULTS.proxy_lr = 0.1                # lr of the one proxy SGD step. TRADES-AWP: 0.1; AT-AWP: 0.01. (It cancels in
                                       # v = gamma ||w|| diff / ||diff|| except through the 1e-20 guard.)
# No perturbation while step < warmup_steps (in optimizer steps). TRADES-AWP applies AWP
# from epoch 10 of 1-indexed epochs (awp_warmup=10), i.e. set 9 * steps_per_epoch to
# reproduce it; AT-AWP uses 0.
DEFAULTS.warmup_steps = 0
# fmt: on

EPS = 1e-20
_PROXY_KEY_SALT = 0x41575  # fresh randomness (mixup, noise) for the proxy pass


def weight_perturbation(params, proxy_params, gamma):
  """``v`` per tensor: ``gamma ||w|| / (||diff|| + 1e-20) * diff`` on ``ndim >= 2``, else 0."""

  def per_tensor(w, w_proxy):
    if w.ndim < 2:
      return jnp.zeros_like(w)
    diff = w_proxy - w
    scale = gamma * jnp.linalg.norm(w.ravel()) / (jnp.linalg.norm(diff.ravel()) + EPS)
    return (scale * diff).astype(w.dtype)

  return jax.tree.map(per_tensor, params, proxy_params)


def awp_perturbation(
  loss_fn,
  params,
  model_state,
  aux_state,
  batch,
  adv,
  key,
  step,
  *,
  gamma: float,
  proxy_lr: float,
  warmup_steps: int = 0,
):
  """``(v, active)``: AWP's weight perturbation at ``w = stop_gradient(params)``.

  ``loss_fn`` is an objective's ``loss``; the proxy takes one SGD step of size
  ``proxy_lr`` on ``-loss_fn`` (same ``adv``, BN/aux state of the proxy pass discarded)
  and ``v`` is :func:`weight_perturbation` of the step, zero while ``step < warmup_steps``.
  """
  w = jax.lax.stop_gradient(params)
  proxy_key = jax.random.fold_in(key, _PROXY_KEY_SALT)

  def proxy_objective(p):
    value, _ = loss_fn(p, model_state, aux_state, batch, adv, proxy_key, step)
    return -value  # the proxy ascends the inner loss; its BN/aux state is discarded

  grads = jax.grad(proxy_objective)(w)
  proxy = jax.tree.map(lambda p, g: p - proxy_lr * g, w, grads)
  v = weight_perturbation(w, proxy, gamma)
  active = jnp.asarray(step) >= warmup_steps
  v = jax.tree.map(lambda t: jnp.where(active, t, jnp.zeros_like(t)), v)
  return jax.lax.stop_gradient(v), active


def awp(
  objective: base.Objective,
  model=None,
  config=None,
  *,
  gamma: float | None = None,
  proxy_lr: float | None = None,
  warmup_steps: int | None = None,
) -> base.Objective:
  """Wraps ``objective.loss`` with AWP; hyperparameters from ``config.objective.awp``.

  Keyword arguments override the config (for direct use: ``awp(trades(model, cfg), gamma=...)``).
  """
  del model
  cfg = defaults.objective_config(config, "awp", DEFAULTS)
  gamma = float(cfg.gamma if gamma is None else gamma)
  proxy_lr = float(cfg.proxy_lr if proxy_lr is None else proxy_lr)
  warmup_steps = int(cfg.warmup_steps if warmup_steps is None else warmup_steps)
  inner = objective

  def loss(params, model_state, aux_state, batch, adv, key, step):
    v, active = awp_perturbation(
      inner.loss,
      params,
      model_state,
      aux_state,
      batch,
      adv,
      key,
      step,
      gamma=gamma,
      proxy_lr=proxy_lr,
      warmup_steps=warmup_steps,
    )
    perturbed = jax.tree.map(jnp.add, params, v)
    value, aux = inner.loss(perturbed, model_state, aux_state, batch, adv, key, step)
    # The passes are the inner objective's, at w + v (what the update differentiates).
    return value, aux._replace(metrics=dict(aux.metrics, awp_active=active.astype(jnp.float32)))

  policy = inner.bn_policy._replace(
    update=f"{inner.bn_policy.update}, at w+v; AWP proxy pass: batch statistics, not kept"
  )
  return inner._replace(name=f"{inner.name}+awp", loss=loss, bn_policy=policy)


def transform(inner: base.Objective, model, config) -> base.Objective:
  """``<objective>+awp`` from the config grammar."""
  return awp(inner, model, config)
