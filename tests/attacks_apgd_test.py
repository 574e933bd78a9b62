"""APGD and the DLR losses: hand values, the reference's checkpoint rule and trajectory."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

# Modules by path: agad.attacks re-exports the functions apgd, fab, square and
# autoattack, which shadow the submodules of the same names as package attributes.
apgd_lib = importlib.import_module("agad.attacks.apgd")
runner_lib = importlib.import_module("agad.attacks.batching")
dlr_lib = importlib.import_module("agad.attacks.dlr")

from tests.helpers import ATTACK_CLASSES as CLASSES, ATTACK_DIM as DIM, ATTACK_SHAPE as SHAPE
from tests.helpers import linear_logits as _linear


def _mlp(w1, w2, x):
  return jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2


def _linear_model(seed=0):
  rng = np.random.RandomState(seed)
  w = rng.randn(DIM, CLASSES).astype(np.float32)
  b = rng.randn(CLASSES).astype(np.float32)
  return w, b, Partial(_linear, jnp.asarray(w), jnp.asarray(b))


def _mlp_model(seed=0):
  rng = np.random.RandomState(seed)
  w1 = jnp.asarray(rng.randn(DIM, 32).astype(np.float32))
  w2 = jnp.asarray(rng.randn(32, CLASSES).astype(np.float32))
  return Partial(_mlp, w1, w2)


def _data(logits_fn, n=16, seed=1):
  x = jax.random.uniform(jax.random.key(seed), (n,) + SHAPE)
  return x, jnp.argmax(logits_fn(x), -1)


def _accuracy(logits_fn, x_adv, y):
  return float(jnp.mean(jnp.argmax(logits_fn(x_adv), -1) == y))


# ------------------------------------------------------------------------------ DLR


def test_dlr_hand_values():
  logits = jnp.array([[3.0, 1.0, 2.0, 0.0], [3.0, 1.0, 2.0, 0.0]])
  # Sorted: 3, 2, 1, 0. y=0: -(3 - 2) / (3 - 1); y=1: -(1 - 3) / (3 - 1).
  np.testing.assert_allclose(dlr_lib.dlr(logits, jnp.array([0, 1])), [-0.5, 1.0], rtol=1e-6)
  # Targeted, y=0, t=3: -(3 - 0) / (3 - (1 + 0) / 2); y=1, t=0: -(1 - 3) / 2.5.
  np.testing.assert_allclose(
    dlr_lib.dlr_targeted(logits, jnp.array([0, 1]), jnp.array([3, 0])), [-1.2, 0.8], rtol=1e-6
  )


def test_dlr_invariant_to_shift_and_positive_scale():
  logits = jax.random.normal(jax.random.key(0), (8, 10))
  labels = jnp.arange(8) % 10
  targets = (labels + 3) % 10
  for fn, args in ((dlr_lib.dlr, (labels,)), (dlr_lib.dlr_targeted, (labels, targets))):
    base = fn(logits, *args)
    np.testing.assert_allclose(fn(logits + 7.5, *args), base, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fn(3.0 * logits, *args), base, rtol=1e-5, atol=1e-6)
    assert not np.allclose(fn(-logits, *args), base)  # a negative scale is not allowed


def test_dlr_needs_enough_classes():
  with pytest.raises(ValueError, match="at least 3"):
    dlr_lib.dlr(jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32))
  with pytest.raises(ValueError, match="at least 4"):
    dlr_lib.dlr_targeted(jnp.zeros((1, 3)), jnp.zeros((1,), jnp.int32), jnp.ones((1,), jnp.int32))


def test_ranked_targets():
  logits = jnp.array([[0.1, 0.5, 0.3, 0.9, 0.2]])
  # Descending order 3, 1, 2, 4, 0: targets are ranks 2.. = 1, 2, 4.
  np.testing.assert_array_equal(dlr_lib.ranked_targets(logits, 3), [[1, 2, 4]])


# ---------------------------------------------------------------------- checkpoints


def test_checkpoints_follow_the_reference_integer_rule():
  # Reference (autopgd_base.py): first window n_iter_2 = max(int(0.22 N), 1), then
  # k = max(k - max(int(0.03 N), 1), max(int(0.06 N), 1)) after each check.
  # N = 100: windows 22, 19, 16, 13, 10, 7, 6, 6 -> 22, 41, 57, 70, 80, 87, 93, 99
  # (= ceil(p_j N) for the paper's p_j).
  assert apgd_lib.apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
  # N = 10: first window int(2.2) = 2, decrement max(int(0.3), 1) = 1, minimum
  # max(int(0.6), 1) = 1 -> windows 2, 1, 1, ... (the paper's ceil(p_j N) would give 3, 5, ...).
  assert apgd_lib.apgd_checkpoints(10) == [0, 2, 3, 4, 5, 6, 7, 8, 9, 10]
  # N = 50: windows 11, 10, 9, 8, 7 (decrement 1, minimum 3); 45 + 6 > 50 stops.
  assert apgd_lib.apgd_checkpoints(50) == [0, 11, 21, 30, 38, 45]


# -------------------------------------------------------------- reference trajectory


def _reference_apgd_ce(logits_fn, x, y, x_start, eps, n_iter, rho=0.75):
  """APGD-CE (L-inf), written from the reference's semantics in numpy.

  Only the model's loss and input gradient come from JAX (a separate jitted function),
  so that both sides see bit-identical losses: the test is about the control flow
  (momentum, projections, checkpoints, best-point bookkeeping), and near-ties between
  losses would otherwise make the two trajectories part on float rounding.
  """
  n = x.shape[0]

  @jax.jit
  def model(v):
    def total(v):
      logits = logits_fn(v)
      value = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(y)[:, None], 1)[:, 0]
      return jnp.sum(value), (value, logits)

    grad, (value, logits) = jax.grad(total, has_aux=True)(v)
    return jnp.argmax(logits, -1), value, grad

  def loss_and_grad(v):
    return tuple(np.array(a) for a in model(jnp.asarray(v)))

  def proj(v):
    return np.clip(np.clip(v, x - eps, x + eps), 0.0, 1.0)

  window, decrement, minimum = (
    max(int(0.22 * n_iter), 1),
    max(int(0.03 * n_iter), 1),
    max(int(0.06 * n_iter), 1),
  )
  cur = np.clip(x_start, 0.0, 1.0)
  pred, loss, grad = loss_and_grad(cur)
  best, best_loss, best_grad = cur.copy(), loss.copy(), grad.copy()
  adv, robust = cur.copy(), pred == y
  step = np.full((n, 1, 1, 1), 2 * eps, np.float32)
  prev = cur.copy()
  history = np.zeros((n_iter, n), np.float32)  # row -1 is still 0 at the first check
  since_check, last_best, reduced_last = 0, best_loss.copy(), np.ones(n, bool)
  for i in range(n_iter):
    momentum = cur - prev
    prev = cur.copy()
    a = 0.75 if i > 0 else 1.0
    z = proj(cur + step * np.sign(grad))
    cur = proj(cur + a * (z - cur) + (1 - a) * momentum)
    pred, loss, grad = loss_and_grad(cur)
    robust &= pred == y
    adv[pred != y] = cur[pred != y]
    history[i] = loss
    better = loss > best_loss
    best[better], best_grad[better], best_loss[better] = cur[better], grad[better], loss[better]
    since_check += 1
    if since_check == window:
      increases = sum((history[i - j] > history[i - j - 1]).astype(int) for j in range(window))
      reduce = (increases <= window * rho) | (~reduced_last & (last_best >= best_loss))
      reduced_last, last_best = reduce, best_loss.copy()
      step[reduce] /= 2
      cur[reduce], grad[reduce] = best[reduce], best_grad[reduce]
      window, since_check = max(window - decrement, minimum), 0
  return best, best_loss, adv, robust, step.ravel()


def test_apgd_ce_matches_reference_trajectory():
  n_iter = 30
  rng = np.random.RandomState(3)
  w1 = rng.randn(DIM, 16).astype(np.float32) * 0.5
  w2 = rng.randn(16, CLASSES).astype(np.float32)
  logits_fn = Partial(_mlp, jnp.asarray(w1), jnp.asarray(w2))
  x, y = _data(logits_fn, n=16, seed=4)
  eps = np.float32(0.05)
  u = np.asarray(jax.random.uniform(jax.random.key(5), x.shape, minval=-1.0, maxval=1.0))
  x_np = np.asarray(x)
  x_start = np.clip(
    x_np + eps * u / np.abs(u).reshape(16, -1).max(1)[:, None, None, None], 0, 1
  ).astype(np.float32)
  ref_best, ref_loss, ref_adv, ref_robust, ref_step = _reference_apgd_ce(
    logits_fn, x_np, np.asarray(y), x_start, eps, n_iter
  )

  first, decrement, minimum = apgd_lib.apgd_schedule(n_iter)
  init = apgd_lib._init_rule("linf", "ce", False, 1)
  state = init(logits_fn, x, y, y, jnp.float32(eps), first, jax.random.key(0), jnp.asarray(x_start))
  step = Partial(
    apgd_lib._step_rule("linf", "ce", False, 1),
    logits_fn,
    x,
    y,
    y,
    jnp.float32(eps),
    jnp.float32(0.75),
    jnp.int32(decrement),
    jnp.int32(minimum),
  )
  state = runner_lib.run_steps(step, state, n_iter, driver="host", chunk=10)

  assert len(np.unique(ref_step)) > 1  # the step-size rule acted differently per example
  assert 0 < ref_robust.sum() < 16
  np.testing.assert_allclose(state.step_size, ref_step, rtol=1e-6)
  np.testing.assert_allclose(state.loss_best, ref_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.x_best, ref_best, atol=1e-6)
  np.testing.assert_array_equal(state.robust, ref_robust)
  np.testing.assert_allclose(state.x_adv, ref_adv, atol=1e-6)


def test_first_window_compares_with_zero_like_the_reference():
  # The reference counts loss increases over a window with loss_steps[i] > loss_steps[i-1];
  # for the first iteration that reads row -1, still 0, instead of the start point's loss.
  # With N = 5 the first window is 1 iteration: a still-correct point (DLR < 0) counts no
  # increase even though one gradient step raised its loss, so its step size halves.
  logits_fn = _mlp_model(4)
  x, y = _data(logits_fn, n=8, seed=11)
  eps = 1e-3
  first, decrement, minimum = apgd_lib.apgd_schedule(5)
  assert first == 1
  init = apgd_lib._init_rule("linf", "dlr", False, 1)
  state = init(logits_fn, x, y, y, jnp.float32(eps), first, jax.random.key(0))
  step = Partial(
    apgd_lib._step_rule("linf", "dlr", False, 1),
    logits_fn,
    x,
    y,
    y,
    jnp.float32(eps),
    jnp.float32(0.75),
    jnp.int32(decrement),
    jnp.int32(minimum),
  )
  after = runner_lib.run_steps(step, state, 1, driver="host", chunk=1)
  assert bool(jnp.all(after.loss_prev < 0))
  assert bool(jnp.any(after.loss_prev > state.loss_best))  # the loss did go up
  np.testing.assert_allclose(after.step_size, eps)  # ... and the step still halved


# ------------------------------------------------------------------------ behaviour


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.5)])
def test_apgd_stays_in_ball_and_box(norm, eps):
  logits_fn = _mlp_model(0)
  x = jax.random.uniform(jax.random.key(2), (8,) + SHAPE)
  x = x.at[:4].set(jnp.round(x[:4]))  # pixels on the box faces
  y = jnp.argmax(logits_fn(x), -1)
  adv = apgd_lib.apgd(logits_fn, x, y, jax.random.key(3), eps=eps, norm=norm, steps=10, loss="dlr")
  assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
  size = runner_lib.lp_norm(adv - x, norm)
  assert float(size.max()) <= eps + 1e-5


@pytest.mark.slow
def test_apgd_breaks_a_non_robust_model_and_is_at_least_as_strong_as_pgd():
  from agad import attacks

  logits_fn = _mlp_model(1)
  x, y = _data(logits_fn, n=32, seed=6)
  assert (
    _accuracy(logits_fn, apgd_lib.apgd(logits_fn, x, y, jax.random.key(0), eps=0.3, steps=10), y)
    == 0.0
  )
  # A radius where PGD-10 leaves part of the points robust.
  eps = 0.03
  pgd_adv = attacks.pgd(logits_fn, x, y, jax.random.key(1), eps=eps, step_size=eps / 4, steps=10)
  apgd_adv = apgd_lib.apgd(logits_fn, x, y, jax.random.key(1), eps=eps, steps=10)
  pgd_acc, apgd_acc = _accuracy(logits_fn, pgd_adv, y), _accuracy(logits_fn, apgd_adv, y)
  assert 0.0 < pgd_acc < 1.0
  assert apgd_acc <= pgd_acc


def test_apgd_targeted_reaches_the_target_class():
  w, b, logits_fn = _linear_model(7)
  x, y = _data(logits_fn, n=8, seed=8)
  targets = dlr_lib.ranked_targets(logits_fn(x), 1)[:, 0]
  result = apgd_lib.apgd_attack(
    logits_fn, x, y, jax.random.key(0), eps=0.5, steps=10, loss="dlr-targeted", targets=targets
  )
  assert not bool(result.robust.any())
  # Best targeted-DLR loss > 0 means the target logit overtook the true one.
  assert bool(jnp.all(result.loss > 0))
  adv = apgd_lib.apgd_targeted(
    logits_fn, x, y, jax.random.key(1), eps=0.3, steps=10, n_target_classes=3
  )
  assert _accuracy(logits_fn, adv, y) == 0.0


@pytest.mark.slow
def test_apgd_restarts_only_improve_and_eot_runs_on_a_random_model():
  logits_fn = _mlp_model(2)
  x, y = _data(logits_fn, n=16, seed=9)
  one = apgd_lib.apgd_attack(logits_fn, x, y, jax.random.key(0), eps=0.03, steps=10)
  three = apgd_lib.apgd_attack(logits_fn, x, y, jax.random.key(0), eps=0.03, steps=10, restarts=3)
  # Restart 0 is shared, later restarts can only break more points or raise the loss.
  assert not bool(jnp.any(three.robust & ~one.robust))
  assert bool(jnp.all(three.loss >= one.loss - 1e-6))

  def noisy(x, key):
    # Value within 0.03 of the model's, input gradient swamped by a fresh random direction
    # per call: only the mean over draws (EOT) points uphill.
    flat = x.reshape(x.shape[0], -1)
    r = jax.random.normal(key, (flat.shape[1], CLASSES))
    return logits_fn(x) + 0.03 * jnp.sin(1e3 * flat @ r)

  # EOT's gain is a few points per seed on 16 points: pool 4 seeds x 32 points so that the
  # comparison does not hang on one draw (measured: 0.23 with EOT, 0.38 without).
  x, y = _data(logits_fn, n=32, seed=9)
  eot = lambda n: np.mean(
    [
      _accuracy(
        logits_fn,
        apgd_lib.apgd(
          Partial(noisy),
          x,
          y,
          jax.random.key(seed),
          eps=0.06,
          steps=20,
          eot_iter=n,
          stochastic=True,
        ),
        y,
      )
      for seed in range(4)
    ]
  )
  with_eot, without_eot = eot(8), eot(1)
  assert with_eot <= 0.3
  assert without_eot >= with_eot + 0.08  # without EOT the same budget does worse


def test_apgd_is_traceable_with_the_unroll_driver():
  logits_fn = _mlp_model(3)
  x, y = _data(logits_fn, n=4, seed=10)
  fn = jax.jit(lambda x, y, k: apgd_lib.apgd(logits_fn, x, y, k, eps=0.1, steps=3, driver="unroll"))
  adv = fn(x, y, jax.random.key(0))
  assert adv.shape == x.shape and float(jnp.abs(adv - x).max()) <= 0.1 + 1e-6
