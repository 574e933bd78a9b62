"""TRADES / MART / ALP / IAT objectives on the tiny BN network: wiring, BN order, attacks."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from agad import models
from agad.attacks import iterative as pgd_lib
from agad.objectives import base
from agad.objectives.alp import alp, alp_loss
from tests.helpers import objective_defaults
from agad.objectives.iat import iat
from agad.objectives.mart import mart, mart_loss
from agad.defenses import build_objective
from agad.objectives.trades import trades, trades_loss

EPS = 0.1
B, H, W, C = 6, 8, 8, 1


def make_config(**objective_overrides):
  c = ml_collections.ConfigDict()
  c.objective = objective_defaults()
  for path, value in objective_overrides.items():
    name, field = path.split("__")
    c.objective[name][field] = value
  c.attack = ml_collections.ConfigDict(
    dict(
      eps=EPS,
      step_size=0.04,
      steps=2,
      norm="linf",
      random_start="uniform",
      bn="eval",
      driver="unroll",
    )
  )
  return c


@pytest.fixture(scope="module")
def setup():
  model = models.build_model("tiny_bn", num_classes=10, mean=(0.5,), std=(0.25,))
  x = jax.random.uniform(jax.random.key(0), (B, H, W, C))
  y = jnp.array([0, 1, 2, 3, 4, 5])
  variables = model.init(jax.random.key(1), x, train=False, labels=y)
  params = variables["params"]
  # Non-trivial running statistics so that eval and train modes differ.
  state = {"batch_stats": jax.tree.map(lambda s: s + 0.3, variables["batch_stats"])}
  return model, params, state, {"image": x, "label": y}


def _train(model, params, state, x, y):
  return base.forward(model, params, state, x, mode="train", labels=y)


def _close(a, b, **kw):
  jax.tree.map(
    lambda u, v: np.testing.assert_allclose(u, v, **{"rtol": 1e-5, "atol": 1e-6, **kw}), a, b
  )


def test_trades_attack_is_kl_from_normal_start_in_eval_mode(setup):
  model, params, state, batch = setup
  obj = trades(model, make_config())
  key = jax.random.key(7)
  adv = obj.generate(params, state, {}, batch, key, 0)
  logits_fn = base.logits_fn_for(model, params, state, mode="eval")
  expected = pgd_lib.pgd(
    logits_fn,
    batch["image"],
    batch["label"],
    key,
    eps=EPS,
    step_size=0.04,
    steps=2,
    random_start="normal",
    loss="kl",
    driver="unroll",
  )
  _close(adv, expected)
  assert float(jnp.abs(adv - batch["image"]).max()) <= EPS + 1e-6
  assert obj.bn_policy.attack == "eval"


def test_trades_loss_and_bn_updates_clean_adv_clean(setup):
  model, params, state, batch = setup
  obj = trades(model, make_config())
  adv = obj.generate(params, state, {}, batch, jax.random.key(7), 0)
  value, (new_state, _, metrics, _) = obj.loss(params, state, {}, batch, adv, jax.random.key(8), 0)
  c1 = _train(model, params, state, batch["image"], batch["label"])
  a2 = _train(model, params, c1.model_state, adv, batch["label"])
  c3 = _train(model, params, a2.model_state, batch["image"], batch["label"])
  np.testing.assert_allclose(
    value, trades_loss(c1.logits, a2.logits, batch["label"], beta=6.0), rtol=1e-5
  )
  _close(new_state, c3.model_state)
  # Two passes would leave different running statistics (the test can fail).
  assert not np.allclose(jax.tree.leaves(a2.model_state)[0], jax.tree.leaves(c3.model_state)[0])
  # Gradient = gradient of trades_loss through one clean and one adversarial pass.
  grad = jax.grad(lambda p: obj.loss(p, state, {}, batch, adv, jax.random.key(8), 0)[0])(params)
  ref = jax.grad(
    lambda p: trades_loss(
      _train(model, p, state, batch["image"], batch["label"]).logits,
      _train(model, p, state, adv, batch["label"]).logits,
      batch["label"],
      beta=6.0,
    )
  )(params)
  _close(grad, ref, rtol=1e-4, atol=1e-6)
  # Option: two passes only.
  obj2 = trades(model, make_config(trades__bn_updates="clean,adv"))
  _, (state2, _, _, _) = obj2.loss(params, state, {}, batch, adv, jax.random.key(8), 0)
  _close(state2, a2.model_state)


def test_mart_attack_and_loss(setup):
  model, params, state, batch = setup
  obj = mart(model, make_config())
  key = jax.random.key(3)
  adv = obj.generate(params, state, {}, batch, key, 0)
  logits_fn = base.logits_fn_for(model, params, state, mode="eval")
  expected = pgd_lib.pgd(
    logits_fn,
    batch["image"],
    batch["label"],
    key,
    eps=EPS,
    step_size=0.04,
    steps=2,
    random_start="normal",
    loss="ce",
    driver="unroll",
  )
  _close(adv, expected)
  value, (new_state, _, _, _) = obj.loss(params, state, {}, batch, adv, key, 0)
  c1 = _train(model, params, state, batch["image"], batch["label"])
  a2 = _train(model, params, c1.model_state, adv, batch["label"])
  np.testing.assert_allclose(
    value, mart_loss(c1.logits, a2.logits, batch["label"], beta=6.0), rtol=1e-5
  )
  _close(new_state, a2.model_state)


def test_alp_least_likely_targeted_attack_and_concatenated_pass(setup):
  model, params, state, batch = setup
  obj = alp(model, make_config())
  key = jax.random.key(4)
  adv = obj.generate(params, state, {}, batch, key, 0)
  logits_fn = base.logits_fn_for(model, params, state, mode="eval")
  target = jnp.argmin(logits_fn(batch["image"]), -1)
  expected = pgd_lib.pgd(
    logits_fn,
    batch["image"],
    target,
    jax.random.split(key)[1],
    eps=EPS,
    step_size=0.04,
    steps=2,
    random_start="uniform",
    loss="ce",
    targeted=True,
    driver="unroll",
  )
  _close(adv, expected)
  value, (new_state, _, _, _) = obj.loss(params, state, {}, batch, adv, key, 0)
  both = _train(
    model,
    params,
    state,
    jnp.concatenate([batch["image"], adv]),
    jnp.concatenate([batch["label"], batch["label"]]),
  )
  lc, la = jnp.split(both.logits, 2)
  np.testing.assert_allclose(
    value, alp_loss(lc, la, batch["label"], weight=0.5, label_smoothing=0.1), rtol=1e-5
  )
  _close(new_state, both.model_state)


def test_iat_without_mixing_is_mean_of_clean_and_adversarial_ce(setup):
  model, params, state, batch = setup
  obj = iat(model, make_config(iat__mixup_alpha=0.0))  # lambda = 1: no interpolation
  adv = obj.generate(params, state, {}, batch, jax.random.key(5), 0)
  value, (new_state, _, _, _) = obj.loss(params, state, {}, batch, adv, jax.random.key(6), 0)
  c1 = _train(model, params, state, batch["image"], batch["label"])
  a2 = _train(model, params, c1.model_state, adv, batch["label"])
  expected = 0.5 * (
    base.cross_entropy_mean(c1.logits, batch["label"])
    + base.cross_entropy_mean(a2.logits, batch["label"])
  )
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  _close(new_state, a2.model_state)
  mixed = iat(model, make_config())
  v1, (_, _, m, _) = mixed.loss(params, state, {}, batch, adv, jax.random.key(6), 0)
  assert 0.0 <= float(m["lam_clean"]) <= 1.0 and float(m["lam_clean"]) != float(m["lam_adv"])
  assert abs(float(v1) - float(value)) > 1e-4


def test_registry_names_and_errors(setup):
  model, _, _, _ = setup
  cfg = make_config()
  for name in ("trades", "mart", "alp", "iat", "cas", "trades+awp", "mart+awp"):
    assert build_objective(name, model, cfg).name == name
  with pytest.raises(ValueError, match="transform"):
    build_objective("awp+trades", model, cfg)
  with pytest.raises(ValueError, match="target"):
    alp(model, make_config(alp__target="bogus"))
