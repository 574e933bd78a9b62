"""AWP: relative per-layer perturbation, gradient at w+v, update on w, same adv, BN untouched."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from agad import models
from agad.objectives.awp import awp, awp_perturbation, weight_perturbation
from tests.helpers import objective_defaults
from agad.defenses import build_objective
from agad.objectives.pgd_at import pgd_at
from agad.objectives.trades import trades
from agad.training.state import init_train_state
from agad.training.step import make_train_step

GAMMA, PROXY_LR = 0.01, 0.1
B, H, W, C = 4, 8, 8, 1


@pytest.fixture(scope="module")
def setup():
  cfg = ml_collections.ConfigDict()
  cfg.objective = objective_defaults()
  cfg.objective.awp.gamma = GAMMA
  cfg.objective.awp.proxy_lr = PROXY_LR
  cfg.attack = ml_collections.ConfigDict(
    dict(
      eps=0.1,
      step_size=0.05,
      steps=1,
      norm="linf",
      random_start="uniform",
      bn="eval",
      driver="unroll",
    )
  )
  model = models.build_model("tiny_bn", num_classes=10, mean=(0.5,), std=(0.25,))
  x = jax.random.uniform(jax.random.key(0), (B, H, W, C))
  batch = {"image": x, "label": jnp.array([0, 1, 2, 3])}
  variables = model.init(jax.random.key(1), x, train=False)
  params = variables["params"]
  state = {"batch_stats": variables["batch_stats"]}
  inner = trades(model, cfg)
  adv = inner.generate(params, state, {}, batch, jax.random.key(2), 0)
  return cfg, model, inner, params, state, batch, adv


def _numpy_v(inner, params, state, batch, adv, key, step):
  """Independent AWP perturbation: proxy SGD step on -L, per-tensor relative rescale."""
  proxy_key = jax.random.fold_in(key, 0x41575)
  g = jax.grad(lambda p: -inner.loss(p, state, {}, batch, adv, proxy_key, step)[0])(params)

  def per(w, gw):
    w, gw = np.asarray(w, np.float64), np.asarray(gw, np.float64)
    if w.ndim < 2:
      return np.zeros_like(w)
    diff = (w - PROXY_LR * gw) - w
    return GAMMA * np.linalg.norm(w) / (np.linalg.norm(diff) + 1e-20) * diff

  return jax.tree.map(per, params, g)


def test_weight_perturbation_relative_norm_and_skips_vectors():
  k = jax.random.split(jax.random.key(0), 4)
  w = {
    "conv": {"kernel": jax.random.normal(k[0], (3, 3, 2, 4)), "bias": jnp.ones(4)},
    "dense": {"kernel": jax.random.normal(k[1], (5, 3))},
    "bn": {"scale": jnp.ones(3)},
  }
  proxy = jax.tree.map(
    lambda t, kk: t + 0.1 * jax.random.normal(kk, t.shape),
    w,
    jax.tree.unflatten(jax.tree.structure(w), list(jax.random.split(k[2], 4))),
  )
  v = weight_perturbation(w, proxy, 0.005)
  for name in ("conv", "dense"):
    ratio = jnp.linalg.norm(v[name]["kernel"]) / jnp.linalg.norm(w[name]["kernel"])
    np.testing.assert_allclose(ratio, 0.005, rtol=1e-5)
    diff = proxy[name]["kernel"] - w[name]["kernel"]
    cos = jnp.sum(v[name]["kernel"] * diff) / (
      jnp.linalg.norm(v[name]["kernel"]) * jnp.linalg.norm(diff)
    )
    np.testing.assert_allclose(cos, 1.0, rtol=1e-5)  # along the proxy step
  assert float(jnp.abs(v["conv"]["bias"]).max()) == 0.0
  assert float(jnp.abs(v["bn"]["scale"]).max()) == 0.0


def test_awp_gradient_at_w_plus_v_and_bn_statistics_of_that_pass(setup):
  cfg, model, inner, params, state, batch, adv = setup
  key, step = jax.random.key(3), jnp.int32(5)
  wrapped = awp(inner, model, cfg)
  v, active = awp_perturbation(
    inner.loss, params, state, {}, batch, adv, key, step, gamma=GAMMA, proxy_lr=PROXY_LR
  )
  assert bool(active)
  v_ref = _numpy_v(inner, params, state, batch, adv, key, step)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), v, v_ref)
  for path, (w, t) in zip(
    jax.tree_util.tree_leaves_with_path(params), zip(jax.tree.leaves(params), jax.tree.leaves(v))
  ):
    if w.ndim >= 2:
      np.testing.assert_allclose(
        jnp.linalg.norm(t) / jnp.linalg.norm(w), GAMMA, rtol=1e-4, err_msg=str(path[0])
      )
    else:
      assert float(jnp.abs(t).max()) == 0.0
  perturbed = jax.tree.map(jnp.add, params, v)
  (value, (new_state, _, _, _)), grads = jax.value_and_grad(wrapped.loss, has_aux=True)(
    params, state, {}, batch, adv, key, step
  )
  (ref_value, (ref_state, _, _, _)), ref_grads = jax.value_and_grad(inner.loss, has_aux=True)(
    perturbed, state, {}, batch, adv, key, step
  )
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, ref_grads
  )
  # The proxy pass leaves the running statistics alone: only the pass at w+v counts.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), new_state, ref_state
  )
  # ...and the gradient at w differs (the perturbation matters).
  g_w = jax.grad(lambda p: inner.loss(p, state, {}, batch, adv, key, step)[0])(params)
  assert (
    max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g_w), jax.tree.leaves(grads)))
    > 1e-6
  )


def test_awp_warmup_gives_zero_perturbation(setup):
  cfg, model, inner, params, state, batch, adv = setup
  wrapped = awp(inner, model, cfg, warmup_steps=10)
  key = jax.random.key(3)
  loss = jax.jit(
    lambda p, s: jax.value_and_grad(wrapped.loss, has_aux=True)(p, state, {}, batch, adv, key, s)
  )
  (value, (_, _, metrics, _)), grads = loss(params, jnp.int32(9))
  (ref_value, _), ref_grads = jax.value_and_grad(inner.loss, has_aux=True)(
    params, state, {}, batch, adv, key, 9
  )
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads
  )
  assert float(metrics["awp_active"]) == 0.0
  (value10, (_, _, metrics10, _)), _ = loss(params, jnp.int32(10))
  assert float(metrics10["awp_active"]) == 1.0 and abs(float(value10) - float(ref_value)) > 1e-7


def test_train_step_reuses_adv_and_updates_unperturbed_weights(setup):
  cfg, model, _, _, _, batch, _ = setup
  calls = {"generate": 0, "loss_adv": []}
  base_obj = pgd_at(model, cfg)

  def generate(*args):
    calls["generate"] += 1
    return base_obj.generate(*args)

  def loss(params, model_state, aux_state, batch_, adv, key, step):
    calls["loss_adv"].append(adv)
    return base_obj.loss(params, model_state, aux_state, batch_, adv, key, step)

  counted = base_obj._replace(generate=generate, loss=loss)
  wrapped = awp(counted, model, cfg)
  lr = 0.05
  tx = optax.sgd(lr)
  state0 = init_train_state(model, wrapped, tx, batch, jax.random.key(9), ema_decay=0.0)
  new_state, _ = jax.jit(make_train_step(wrapped, tx, ema_decay=0.0))(state0, batch)
  assert calls["generate"] == 1  # one attack per step
  assert len(calls["loss_adv"]) == 2  # proxy pass + pass at w + v
  assert calls["loss_adv"][0] is calls["loss_adv"][1]  # the same adversarial batch
  # Reference: the same generate, then grad at w+v, applied to w.
  calls["loss_adv"].clear()
  key = jax.random.fold_in(state0.key, state0.step)
  k_gen, k_loss = jax.random.split(key)
  adv = base_obj.generate(state0.params, state0.model_state, {}, batch, k_gen, state0.step)
  v, _ = awp_perturbation(
    base_obj.loss,
    state0.params,
    state0.model_state,
    {},
    batch,
    adv,
    k_loss,
    state0.step,
    gamma=GAMMA,
    proxy_lr=PROXY_LR,
  )
  perturbed = jax.tree.map(jnp.add, state0.params, v)
  g = jax.grad(lambda p: base_obj.loss(p, state0.model_state, {}, batch, adv, k_loss, 0)[0])(
    perturbed
  )
  expected = jax.tree.map(lambda w, gw: w - lr * gw, state0.params, g)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), new_state.params, expected
  )
  # Not w + v - lr g: the perturbation is gone after the step.
  assert (
    max(
      float(jnp.abs(a - b).max())
      for a, b in zip(
        jax.tree.leaves(new_state.params), jax.tree.leaves(jax.tree.map(jnp.add, expected, v))
      )
    )
    > 1e-6
  )


def test_composition_order_trades_plus_awp_is_awp_of_trades(setup):
  cfg, model, inner, params, state, batch, adv = setup
  by_name = build_objective("trades+awp", model, cfg)
  by_hand = awp(trades(model, cfg), model, cfg)
  assert by_name.name == "trades+awp"
  key = jax.random.key(11)
  a = jax.value_and_grad(by_name.loss, has_aux=True)(params, state, {}, batch, adv, key, 3)
  b = jax.value_and_grad(by_hand.loss, has_aux=True)(params, state, {}, batch, adv, key, 3)
  jax.tree.map(lambda u, w: np.testing.assert_allclose(u, w, rtol=1e-6, atol=1e-9), a, b)
