"""Pure objective losses against hand / NumPy computations (reductions included)."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from agad.objectives.alp import alp_loss
from agad import defenses
from agad.objectives.defaults import bn_pass_order, objective_config
from tests.helpers import objective_defaults
from agad.objectives.iat import mixup_batch, mixup_cross_entropy
from agad.objectives.mart import mart_loss
from agad.objectives.trades import kl_clean_adv, trades_loss

# Fixed tiny logits: 3 examples, 4 classes.
LC = np.array([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, -0.4], [-1.0, 3.0, 0.5, 0.5]], np.float32)
LA = np.array([[0.5, 1.5, -0.5, 0.2], [1.0, -0.3, 0.3, 0.0], [-0.2, 0.4, 2.5, 0.1]], np.float32)
Y = np.array([0, 2, 1])


def _softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _ce(z, y):
  p = _softmax(z)
  return -np.log(p[np.arange(len(y)), y])


def test_trades_beta_zero_is_clean_cross_entropy():
  value = trades_loss(jnp.asarray(LC), jnp.asarray(LA), jnp.asarray(Y), beta=0.0)
  np.testing.assert_allclose(value, _ce(LC, Y).mean(), rtol=1e-6)


def test_trades_hand_value_two_classes():
  # p = (1/2, 1/2), q = (3/4, 1/4): CE = log 2, KL(p||q) = 1/2 log(4/3).
  lc, la = jnp.array([[0.0, 0.0]]), jnp.array([[math.log(3.0), 0.0]])
  value = trades_loss(lc, la, jnp.array([0]), beta=2.0)
  np.testing.assert_allclose(value, math.log(2.0) + math.log(4.0 / 3.0), rtol=1e-6)


def test_trades_against_numpy_sum_kl_over_batch():
  p, q = _softmax(LC), _softmax(LA)
  kl = (p * (np.log(p) - np.log(q))).sum(-1)
  expected = _ce(LC, Y).mean() + 6.0 * kl.sum() / len(Y)
  value = trades_loss(jnp.asarray(LC), jnp.asarray(LA), jnp.asarray(Y), beta=6.0)
  np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_kl_direction_is_clean_to_adversarial_with_gradient_through_both():
  p, q = _softmax(LC), _softmax(LA)
  forward = (p * (np.log(p) - np.log(q))).sum(-1)
  reverse = (q * (np.log(q) - np.log(p))).sum(-1)
  got = np.asarray(kl_clean_adv(jnp.asarray(LC), jnp.asarray(LA)))
  np.testing.assert_allclose(got, forward, rtol=1e-5)
  assert np.abs(got - reverse).max() > 1e-2  # the reverse direction is a different loss
  # No detach: the robust term has gradient w.r.t. the clean logits too.
  robust = lambda lc, la: (
    trades_loss(lc, la, jnp.asarray(Y), beta=1.0) - trades_loss(lc, la, jnp.asarray(Y), beta=0.0)
  )
  g_clean, g_adv = jax.grad(robust, argnums=(0, 1))(jnp.asarray(LC), jnp.asarray(LA))
  assert float(jnp.abs(g_clean).sum()) > 1e-3 and float(jnp.abs(g_adv).sum()) > 1e-3


def _mart_numpy(lc, la, y, beta):
  """MART's mart.py with explicit per-example loops."""
  B = len(y)
  adv = _softmax(la)
  nat = _softmax(lc)
  ce_adv, boosted, robust = 0.0, 0.0, 0.0
  for b in range(B):
    order = np.argsort(adv[b])
    new_y = order[-2] if order[-1] == y[b] else order[-1]
    ce_adv += -np.log(adv[b, y[b]]) / B
    boosted += -np.log(1.0001 - adv[b, new_y] + 1e-12) / B
    kl = sum(
      nat[b, k] * (np.log(nat[b, k]) - np.log(adv[b, k] + 1e-12)) for k in range(lc.shape[1])
    )
    robust += kl * (1.0000001 - nat[b, y[b]])
  return ce_adv + boosted + beta * robust / B


def test_mart_against_numpy():
  # Example 0: adversarial top class 1 != y = 0 -> y_hat = 1; example 2: top class 2 != 1;
  # example 1 below has its top adversarial class equal to y, so y_hat is the runner-up.
  la = LA.copy()
  la[1] = [0.0, -0.3, 2.0, 1.0]  # top = 2 = y, runner-up = 3
  for beta in (0.0, 6.0):
    value = mart_loss(jnp.asarray(LC), jnp.asarray(la), jnp.asarray(Y), beta=beta)
    np.testing.assert_allclose(value, _mart_numpy(LC, la, Y, beta), rtol=1e-5)


def test_mart_hand_value_single_example():
  # adv probs (0.5, 0.3, 0.2), y = 0 is the top class -> y_hat = 1; clean probs (0.6, 0.3, 0.1).
  q, p = np.array([0.5, 0.3, 0.2]), np.array([0.6, 0.3, 0.1])
  value = mart_loss(jnp.log(jnp.asarray([p])), jnp.log(jnp.asarray([q])), jnp.array([0]), beta=6.0)
  kl = float((p * np.log(p / (q + 1e-12))).sum())
  expected = -math.log(0.5) - math.log(1.0001 - 0.3 + 1e-12) + 6.0 * kl * (1.0000001 - 0.6)
  np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_alp_hand_value():
  lc, la, y = jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 1.0]]), jnp.array([0])
  e = math.e
  # Smoothing 0.1 over 2 classes: target (0.95, 0.05).
  ce_clean = -(0.95 * math.log(e / (e + 1)) + 0.05 * math.log(1 / (e + 1)))
  ce_adv = -(0.95 * math.log(1 / (e + 1)) + 0.05 * math.log(e / (e + 1)))
  expected = 0.5 * (ce_clean + ce_adv) + 0.5 * 1.0  # mean((z - z')^2) = 1
  np.testing.assert_allclose(
    alp_loss(lc, la, y, weight=0.5, label_smoothing=0.1), expected, rtol=1e-6
  )


def test_alp_against_numpy_batch_means():
  K = LC.shape[1]
  t = np.full((len(Y), K), 0.1 / K)
  t[np.arange(len(Y)), Y] += 0.9
  xent = lambda z: -(t * np.log(_softmax(z))).sum(-1)
  expected = np.concatenate([xent(LC), xent(LA)]).mean() + 0.5 * ((LC - LA) ** 2).mean()
  np.testing.assert_allclose(
    alp_loss(jnp.asarray(LC), jnp.asarray(LA), jnp.asarray(Y), weight=0.5), expected, rtol=1e-5
  )


def test_mixup_batch_and_criterion():
  x = jnp.arange(5.0).reshape(5, 1, 1, 1)
  mixed, perm, lam = mixup_batch(jax.random.key(0), x, 1.0)
  assert sorted(np.asarray(perm).tolist()) == list(range(5))
  assert 0.0 <= float(lam) <= 1.0
  np.testing.assert_allclose(mixed, lam * x + (1 - lam) * x[perm], rtol=1e-6)
  _, _, lam0 = mixup_batch(jax.random.key(0), x, 0.0)
  assert float(lam0) == 1.0
  perm = jnp.array([2, 0, 1])
  value = mixup_cross_entropy(jnp.asarray(LC), jnp.asarray(Y), perm, 0.3)
  np.testing.assert_allclose(
    value, 0.3 * _ce(LC, Y).mean() + 0.7 * _ce(LC, Y[[2, 0, 1]]).mean(), rtol=1e-5
  )


def test_defaults_are_official_and_overrides_merge():
  d = objective_defaults()
  assert (d.trades.beta, d.mart.beta, d.alp.weight, d.alp.label_smoothing, d.cas.weight) == (
    6.0,
    6.0,
    0.5,
    0.1,
    2.0,
  )
  assert (d.awp.gamma, d.awp.proxy_lr, d.awp.warmup_steps) == (0.005, 0.1, 0)
  assert d.trades.random_start == "normal" and d.mart.random_start == "normal"
  config = ml_collections.ConfigDict({"objective": {"trades": {"beta": 1.0}}})
  merged = objective_config(config, "trades", defenses.defaults("trades"))
  assert merged.beta == 1.0 and merged.bn_updates == "clean,adv,clean"
  assert (
    objective_config(ml_collections.ConfigDict(), "mart", defenses.defaults("mart")).beta == 6.0
  )
  with pytest.raises(KeyError, match="unknown fields"):
    objective_config(
      ml_collections.ConfigDict({"objective": {"trades": {"betta": 1.0}}}),
      "trades",
      defenses.defaults("trades"),
    )
  assert bn_pass_order("adv, clean,clean") == ("adv", "clean", "clean")
  with pytest.raises(ValueError):
    bn_pass_order("clean,clean")


def test_mart_keeps_its_1e_7_floor_on_confident_clean_examples():
  # p_y(x) rounds to 1 in float32: only the 1.0000001 constant keeps the KL term alive
  # (as in mart.py, where float32 1.0000001 - 1.0 = 2^-23); p'_y ~ 3e-14 is below the
  # 1e-12 inside log(p' + 1e-12), which therefore sets the KL's size.
  lc, la, y = jnp.array([[30.0, 0.0, 0.0]]), jnp.array([[-30.0, 0.0, 1.0]]), jnp.array([0])
  beta = 1e7
  q = _softmax(np.asarray(la))[0]
  kl = -np.log(q[0] + 1e-12)  # clean distribution is one-hot at 0
  floor = float(np.float32(1.0000001) - np.float32(1.0))
  without = float(mart_loss(lc, la, y, beta=0.0))
  np.testing.assert_allclose(
    float(mart_loss(lc, la, y, beta=beta)) - without, beta * kl * floor, rtol=1e-3
  )
