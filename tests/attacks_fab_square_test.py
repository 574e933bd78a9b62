"""FAB (L-inf projection, targeted attack) and Square (schedule, accept rule, strength)."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from agad.attacks import losses, square_patterns

# Modules by path: agad.attacks re-exports the functions apgd, fab, square and
# autoattack, which shadow the submodules of the same names as package attributes.
apgd_lib = importlib.import_module("agad.attacks.apgd")
runner_lib = importlib.import_module("agad.attacks.batching")
fab_lib = importlib.import_module("agad.attacks.fab")
square_lib = importlib.import_module("agad.attacks.square")

from tests.helpers import ATTACK_CLASSES as CLASSES, ATTACK_DIM as DIM, ATTACK_SHAPE as SHAPE
from tests.helpers import linear_logits as _linear


def _linear_model(seed=0):
  rng = np.random.RandomState(seed)
  return Partial(
    _linear,
    jnp.asarray(rng.randn(DIM, CLASSES).astype(np.float32)),
    jnp.asarray(rng.randn(CLASSES).astype(np.float32)),
  )


def _data(logits_fn, n=16, seed=1):
  x = jax.random.uniform(jax.random.key(seed), (n,) + SHAPE)
  return x, jnp.argmax(logits_fn(x), -1)


def _accuracy(logits_fn, x_adv, y):
  return float(jnp.mean(jnp.argmax(logits_fn(x_adv), -1) == y))


# ----------------------------------------------------------------------------- FAB


def _min_linf_by_bisection(t, w, b):
  """Smallest lam with the hyperplane reachable in the box within ||d||_inf <= lam."""
  c = w @ t - b
  if c < 0:
    w, c = -w, -c
  room = np.where(w < 0, 1 - t, t)
  reach = lambda lam: np.sum(np.abs(w) * np.minimum(lam, room))
  if reach(1.0) < c:
    return None
  lo, hi = 0.0, 1.0
  for _ in range(60):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if reach(mid) < c else (lo, mid)
  return hi


def test_linf_projection_is_the_smallest_box_constrained_move():
  rng = np.random.RandomState(0)
  n, d = 64, 12
  t = rng.rand(n, d)
  w = rng.randn(n, d) * (rng.rand(n, d) > 0.2)
  b = t.__mul__(w).sum(1) + rng.randn(n) * rng.choice([0.05, 0.5, 5.0], n)
  delta = np.asarray(
    fab_lib.project_linf_hyperplane_box(
      jnp.asarray(t, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)
    )
  )
  reachable = 0
  for i in range(n):
    moved = t[i] + delta[i]
    assert moved.min() >= -1e-6 and moved.max() <= 1 + 1e-6
    assert np.all(delta[i][w[i] == 0] == 0)
    lam = _min_linf_by_bisection(t[i], w[i], b[i])
    if lam is None:  # unreachable: the box corner furthest towards the hyperplane
      assert abs(w[i] @ moved - b[i]) <= abs(w[i] @ t[i] - b[i]) + 1e-5
      continue
    reachable += 1
    np.testing.assert_allclose(w[i] @ moved, b[i], atol=1e-4)
    np.testing.assert_allclose(np.abs(delta[i]).max(), lam, atol=1e-5)
  assert reachable > n // 2


def test_fab_targeted_finds_small_adversarials_within_eps():
  logits_fn = _linear_model(0)
  x, y = _data(logits_fn, n=16, seed=2)
  targets = jnp.argsort(logits_fn(x), -1)[:, -2]
  result = fab_lib.fab_attack(
    logits_fn, x, y, jax.random.key(0), eps=0.3, steps=10, targets=targets
  )
  assert not bool(result.robust.any())
  norms = runner_lib.lp_norm(result.adversarial - x, "linf")
  np.testing.assert_allclose(norms, result.norm, rtol=1e-5)
  assert float(norms.max()) <= 0.3
  assert _accuracy(logits_fn, result.adversarial, y) == 0.0
  # Minimum norm: on a linear model FAB lands just past the linearised (= true)
  # boundary, so a slightly smaller radius must fail for at least one point.
  smaller = fab_lib.fab_attack(
    logits_fn, x, y, jax.random.key(0), eps=0.5 * float(norms.min()), steps=10, targets=targets
  )
  assert bool(smaller.robust.all())
  # The public entry point loops over ranked targets and returns clean images where it fails.
  adv = fab_lib.fab(logits_fn, x, y, jax.random.key(1), eps=0.3, steps=10, n_target_classes=2)
  assert _accuracy(logits_fn, adv, y) == 0.0
  assert float(runner_lib.lp_norm(adv - x, "linf").max()) <= 0.3 + 1e-6


def _linf_boundary_distances(w, b, x, y):
  """``[N, K]`` closed-form minimal L-inf distance from x to the boundary between y and j
  of a linear model: ``(z_y - z_j) / ||w_y - w_j||_1`` (no box; inf at j = y)."""
  flat = np.asarray(x, np.float64).reshape(len(x), -1)
  z = flat @ w + b
  out = np.full(z.shape, np.inf)
  for i, label in enumerate(np.asarray(y)):
    for j in range(w.shape[1]):
      if j != label:
        out[i, j] = (z[i, label] - z[i, j]) / np.abs(w[:, label] - w[:, j]).sum()
  return out


def test_fab_linf_finds_the_closed_form_minimal_distance_on_a_linear_model():
  rng = np.random.RandomState(7)
  w = rng.randn(DIM, CLASSES).astype(np.float32)
  b = rng.randn(CLASSES).astype(np.float32)
  logits_fn = Partial(_linear, jnp.asarray(w), jnp.asarray(b))
  # Inside [0.3, 0.7]: the box is at least 0.3 away, beyond every minimal distance here.
  x = jax.random.uniform(jax.random.key(3), (16,) + SHAPE, minval=0.3, maxval=0.7)
  y = jnp.argmax(logits_fn(x), -1)
  pair = _linf_boundary_distances(w.astype(np.float64), b.astype(np.float64), x, y)
  closest = pair.min(1)
  assert closest.max() < 0.3
  # Untargeted FAB: the smallest distance over all classes, reached from just past it.
  result = fab_lib.fab_attack(logits_fn, x, y, jax.random.key(0), eps=1.0, steps=10, targeted=False)
  norms = np.asarray(runner_lib.lp_norm(result.adversarial - x, "linf"), np.float64)
  assert not bool(result.robust.any())
  assert np.all(np.asarray(jnp.argmax(logits_fn(result.adversarial), -1)) != np.asarray(y))
  assert np.all(norms >= closest * (1 - 1e-4))
  assert np.all(norms <= closest * 1.02), np.max(norms / closest)
  # Targeted at the runner-up: at most the distance to that boundary (it may cross another
  # class's boundary first, never one closer than the closest).
  targets = jnp.argsort(logits_fn(x), -1)[:, -2]
  to_target = pair[np.arange(16), np.asarray(targets)]
  targeted = fab_lib.fab_attack(
    logits_fn, x, y, jax.random.key(0), eps=1.0, steps=10, targets=targets
  )
  t_norms = np.asarray(targeted.norm, np.float64)
  assert np.all(t_norms >= closest * (1 - 1e-4))
  assert np.all(t_norms <= to_target * 1.02)
  # A radius just below the closed-form minimum cannot succeed.
  below = fab_lib.fab_attack(
    logits_fn, x, y, jax.random.key(0), eps=0.99 * float(closest.min()), steps=10, targeted=False
  )
  assert bool(below.robust.all())


def test_fab_untargeted_runs():
  logits_fn = _linear_model(1)
  x, y = _data(logits_fn, n=8, seed=3)
  adv = fab_lib.fab(logits_fn, x, y, jax.random.key(0), eps=0.3, steps=5, targeted=False)
  assert _accuracy(logits_fn, adv, y) == 0.0


# --------------------------------------------------------------------------- Square


def test_square_schedule_matches_the_reference():
  # p halves after queries 10, 50, 200, 500, 1000, 2000, 4000 (0-based, "it > threshold").
  assert square_patterns.square_p(10) == 0.8 and square_patterns.square_p(11) == 0.4
  assert square_patterns.square_p(4000) == 0.8 / 64 and square_patterns.square_p(4001) == 0.8 / 128
  # Rescaled (not AutoAttack's default): query 6 of 100 counts as 600.
  assert square_patterns.square_p(6, n_queries=100, rescale_schedule=True) == 0.8 / 16
  # 32x32 images: side = round(sqrt(p * 1024)), by hand: 28.6 -> 29, 20.2 -> 20, 14.3 -> 14,
  # 10.1 -> 10, 7.2 -> 7, 5.06 -> 5, 3.58 -> 4, 2.53 -> 3.
  sizes = square_lib.square_sizes(32, 32, 5000)
  assert [int(sizes[i]) for i in (0, 11, 51, 201, 501, 1001, 2001, 4001)] == [
    29,
    20,
    14,
    10,
    7,
    5,
    4,
    3,
  ]
  assert int(square_lib.square_sizes(4, 4, 1)[0]) == 4  # never larger than the image


def test_square_accepts_only_improvements_and_stays_in_ball():
  logits_fn = _linear_model(2)
  x, y = _data(logits_fn, n=16, seed=4)
  eps = 0.05
  result = square_lib.square_attack(logits_fn, x, y, jax.random.key(0), eps=eps, n_queries=40)
  adv = result.adversarial
  assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
  assert float(runner_lib.lp_norm(adv - x, "linf").max()) <= eps + 1e-6
  # Every pixel sits at the ball's edge or a box face (stripes and squares are +-eps).
  delta = np.abs(np.asarray(adv - x))
  at_edge = np.isclose(delta, eps, atol=1e-6) | (np.asarray(adv) == 0) | (np.asarray(adv) == 1)
  assert at_edge.all()
  # The kept margin is the margin of the returned point and never above the start's.
  logits = logits_fn(adv)
  margin = -losses.margin(logits, y)
  keys = runner_lib.fold_in_each(runner_lib.example_keys(jax.random.key(0), 16), 0)
  start = square_lib._init_rule("margin", False)(
    logits_fn, x, y, jnp.float32(eps), runner_lib.split_each(keys)[0]
  )
  assert bool(jnp.all(margin <= start.margin + 1e-5))
  assert bool(jnp.all((margin > 0) == result.robust))


def test_square_breaks_a_non_robust_model():
  logits_fn = _linear_model(3)
  x, y = _data(logits_fn, n=16, seed=5)
  result = square_lib.square_attack(logits_fn, x, y, jax.random.key(0), eps=0.3, n_queries=200)
  assert _accuracy(logits_fn, result.adversarial, y) <= 1 / 16
  # Early exit: an already-broken batch spends no queries beyond the start.
  assert int(result.queries.max()) < 200


@pytest.mark.slow
def test_loop_driver_matches_host_driver():
  # The GPU/TPU path (jitted fori_loop blocks) must give the CPU path's results.
  logits_fn = _linear_model(4)
  x, y = _data(logits_fn, n=8, seed=6)
  key = jax.random.key(0)
  targets = jnp.argsort(logits_fn(x), -1)[:, -2]
  runs = {
    "apgd": lambda d: (
      apgd_lib.apgd_attack(
        logits_fn, x, y, key, eps=0.02, steps=6, loss="dlr", driver=d, chunk=3
      ).adversarial
    ),
    "fab": lambda d: (
      fab_lib.fab_attack(
        logits_fn, x, y, key, eps=0.05, steps=4, targets=targets, driver=d, chunk=2
      ).adversarial
    ),
    "square": lambda d: (
      square_lib.square_attack(
        logits_fn, x, y, key, eps=0.05, n_queries=20, driver=d, chunk=5, check_every=10
      ).adversarial
    ),
  }
  for name, run in runs.items():
    np.testing.assert_allclose(run("loop"), run("host"), atol=1e-6, err_msg=name)


@pytest.mark.parametrize("driver", ["host", "loop"])
def test_square_progress_reports_queries_and_survivors_without_changing_the_result(driver):
  # Progress is reported after each compiled block: queries run so far (over both
  # restarts), the total, and the valid examples still robust; the result is unchanged.
  logits_fn = _linear_model(2)
  x, y = _data(logits_fn, n=8, seed=4)
  valid = jnp.arange(8) < 6  # two padding rows never count
  kw = dict(eps=0.05, n_queries=20, restarts=2, valid=valid, driver=driver, chunk=5)
  kw["check_every"] = 5
  calls = []
  reported = square_lib.square_attack(
    logits_fn, x, y, jax.random.key(0), progress=lambda *a: calls.append(a), **kw
  )
  plain = square_lib.square_attack(logits_fn, x, y, jax.random.key(0), **kw)
  np.testing.assert_array_equal(reported.adversarial, plain.adversarial)
  np.testing.assert_array_equal(reported.robust, plain.robust)
  robust_valid = int(jnp.sum(reported.robust & valid))
  robust_padding = int(jnp.sum(reported.robust & ~valid))
  assert 0 < robust_valid < 6 and robust_padding == 2  # a case that can tell
  # Some example survives both restarts, so neither stops early: every block is reported.
  assert [c[0] for c in calls] == list(range(5, 45, 5))
  assert all(total == 40 for _, total, _ in calls)
  # The last count is the second restart's valid survivors (a superset of those of both
  # restarts); counting the robust padding rows would add 2.
  assert robust_valid <= calls[-1][2] < robust_valid + robust_padding
  assert all(0 <= robust <= 6 for _, _, robust in calls)
