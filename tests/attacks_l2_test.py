"""L2 FAB and L2 Square (and L2 AutoAttack) against NumPy transliterations of the reference.

The transliterations below follow fra31/auto-attack@a392200 (``fab_projections.py``
``projection_l2``; ``square.py`` ``eta_rectangles``, ``eta``, the L2 start and the L2
query of ``attack_single_run``) line by line, in float64 and NCHW, one example at a time.
"""

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from agad.attacks import losses, square_patterns

# Modules by path: agad.attacks re-exports functions of the same names.
runner_lib = importlib.import_module("agad.attacks.batching")
aa = importlib.import_module("agad.attacks.autoattack")
fab_lib = importlib.import_module("agad.attacks.fab")
square_lib = importlib.import_module("agad.attacks.square")

from tests.helpers import ATTACK_CLASSES as CLASSES, ATTACK_DIM as DIM, ATTACK_SHAPE as SHAPE
from tests.helpers import linear_logits as _linear


def _linear_model(seed=0, dim=DIM):
  rng = np.random.RandomState(seed)
  w = rng.randn(dim, CLASSES).astype(np.float32)
  b = rng.randn(CLASSES).astype(np.float32)
  return Partial(_linear, jnp.asarray(w), jnp.asarray(b)), w, b


def _l2(v):
  return np.sqrt(np.sum(np.square(np.asarray(v, np.float64)).reshape(len(v), -1), axis=1))


def _boundary_distance(w, b, x, y):
  """Analytic minimal L2 distance of each x to {argmax != y} of a linear model (no box)."""
  flat = np.asarray(x, np.float64).reshape(len(x), -1)
  z = flat @ w + b
  out = []
  for i, label in enumerate(np.asarray(y)):
    out.append(
      min(
        (z[i, label] - z[i, j]) / np.linalg.norm(w[:, label] - w[:, j])
        for j in range(w.shape[1])
        if j != label
      )
    )
  return np.asarray(out)


# --------------------------------------------------------------------- FAB projection


def _reference_projection_l2(t, w, b):
  """``projection_l2`` of fra31/auto-attack, transliterated to NumPy (float64)."""
  t, w, b = (np.asarray(a, np.float64) for a in (t, w, b))
  c = (w * t).sum(1) - b
  ind2 = 2 * (c >= 0) - 1
  w = w * ind2[:, None]
  c = c * ind2
  with np.errstate(divide="ignore", invalid="ignore"):
    r = np.clip(np.maximum(t / w, (t - 1) / w), -1e12, 1e12)
  r[np.abs(w) < 1e-8] = 1e12
  r[r == -1e12] *= -1
  indr = np.argsort(r, axis=1, kind="stable")
  rs = np.take_along_axis(r, indr, 1)
  rs2 = np.pad(rs[:, 1:], ((0, 0), (0, 1)))
  rs[rs == 1e12] = 0
  rs2[rs2 == 1e12] = 0
  w3s = np.take_along_axis(w**2, indr, 1)
  w5 = w3s.sum(1, keepdims=True)
  ws = w5 - np.cumsum(w3s, 1)
  d = -(r * w) * (np.abs(w) > 1e-8)
  s = np.concatenate([-w5 * rs[:, 0:1], np.cumsum((-rs2 + rs) * ws, 1) - w5 * rs[:, 0:1]], 1)
  c4 = s[:, 0] + c < 0
  c3 = (d * w).sum(1) + c > 0
  c2 = ~(c4 | c3)
  lb = np.zeros(int(c2.sum()))
  ub = np.full_like(lb, w.shape[1] - 1)
  s_, c_ = s[c2], c[c2]
  for _ in range(math.ceil(math.log2(w.shape[1]))):
    counter4 = np.floor((lb + ub) / 2)
    above = np.take_along_axis(s_, counter4.astype(int)[:, None], 1)[:, 0] + c_ > 0
    lb = np.where(above, counter4, lb)
    ub = np.where(above, ub, counter4)
  lb = lb.astype(int)
  if c4.any():
    d[c4] = -(c[c4] / w5[c4, 0])[:, None] * w[c4]
  if c2.any():
    rows = np.nonzero(c2)[0]
    alpha = (s[rows, lb] + c[c2]) / ws[rows, lb] + rs[rows, lb]
    alpha[ws[rows, lb] == 0] = 0
    c5 = (alpha[:, None] > r[c2]).astype(np.float64)
    d[c2] = d[c2] * c5 - alpha[:, None] * w[c2] * (1 - c5)
  return d * (np.abs(w) > 1e-8)


def _projection_problems(seed, n, dim):
  rng = np.random.RandomState(seed)
  t = rng.rand(n, dim)
  t[rng.rand(n, dim) < 0.1] = 0.0  # points on the box faces
  t[rng.rand(n, dim) < 0.1] = 1.0
  w = rng.randn(n, dim) * (rng.rand(n, dim) > 0.2)  # some zero weights
  w[0] = 0.0  # a row with no gradient at all
  # Offsets from "no coordinate saturates" to "the box cannot reach the hyperplane".
  b = (t * w).sum(1) + rng.randn(n) * rng.choice([0.01, 0.3, 1.0, 3.0, 30.0], n)
  return t, w, b


def _project(t, w, b):
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return np.asarray(fab_lib.project_l2_hyperplane_box(f32(t), f32(w), f32(b)), np.float64)


@pytest.mark.parametrize("dim", [1, 2, 7, 48])
def test_l2_projection_matches_the_reference(dim):
  t, w, b = _projection_problems(dim, 128, dim)
  expected = _reference_projection_l2(t, w, b)
  got = _project(t, w, b)
  scale = 1.0 + np.abs(expected).max(1, keepdims=True)
  np.testing.assert_allclose(got / scale, expected / scale, atol=2e-5)


def _min_l2_by_bisection(t, w, b):
  """Independent solver: d(a) = clip(-a w, -t, 1 - t), bisection on a for w.d(a) = -c."""
  c = w @ t - b
  if c < 0:
    w, c = -w, -c
  move = lambda a: np.clip(-a * w, -t, 1 - t)
  if w @ move(1e9) + c > 0:
    return None  # the box cannot reach the hyperplane
  lo, hi = 0.0, 1e9
  for _ in range(200):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if w @ move(mid) + c > 0 else (lo, mid)
  return move(hi)


def test_l2_projection_is_the_smallest_box_constrained_move():
  t, w, b = _projection_problems(1, 64, 12)
  delta = _project(t, w, b)
  rng = np.random.RandomState(2)
  reachable = checked_points = 0
  for i in range(len(t)):
    moved = t[i] + delta[i]
    assert moved.min() >= -1e-6 and moved.max() <= 1 + 1e-6
    assert np.all(delta[i][w[i] == 0] == 0)
    best = _min_l2_by_bisection(t[i], w[i], b[i])
    if best is None:  # unreachable: every moving coordinate on its face, towards the plane
      assert abs(w[i] @ moved - b[i]) <= abs(w[i] @ t[i] - b[i]) + 1e-5
      continue
    reachable += 1
    np.testing.assert_allclose(w[i] @ moved, b[i], atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(delta[i]), np.linalg.norm(best), rtol=1e-4, atol=1e-6)
    # Feasible points nearby (moves within the hyperplane, kept if inside the box) and the
    # unconstrained projection (when inside the box) are never shorter.
    n_w = w[i] / np.linalg.norm(w[i])
    feasible = [-(w[i] @ t[i] - b[i]) * n_w / np.linalg.norm(w[i])]
    for _ in range(20):
      v = rng.randn(len(t[i])) * 0.05
      feasible.append(best + v - (v @ n_w) * n_w)
    checked = 0
    for f in feasible:
      if (t[i] + f).min() >= 0 and (t[i] + f).max() <= 1:
        assert abs(w[i] @ (t[i] + f) - b[i]) < 1e-9
        assert np.linalg.norm(delta[i]) <= np.linalg.norm(f) + 1e-5
        checked += 1
    checked_points += checked > 0
  assert reachable > len(t) // 3
  assert checked_points > reachable // 3


# ---------------------------------------------------------------------------- FAB-L2


def test_fab_l2_finds_the_analytic_minimal_distance_on_a_linear_model():
  logits_fn, w, b = _linear_model(0)
  x = jax.random.uniform(jax.random.key(1), (16,) + SHAPE, minval=0.3, maxval=0.7)
  y = jnp.argmax(logits_fn(x), -1)
  analytic = _boundary_distance(w, b, x, y)
  result = fab_lib.fab_attack(
    logits_fn, x, y, jax.random.key(0), eps=3.0, norm="l2", steps=10, targeted=False, chunk=5
  )
  adv = np.asarray(result.adversarial)
  norms = _l2(adv - np.asarray(x))
  assert not bool(result.robust.any())
  np.testing.assert_allclose(norms, result.norm, rtol=1e-5)
  assert adv.min() >= 0.0 and adv.max() <= 1.0
  assert np.all(np.asarray(jnp.argmax(logits_fn(adv), -1)) != np.asarray(y))
  # On a linear model the linearised boundary is the boundary: FAB ends just past it
  # (the first step overshoots by eta = 1.05, later ones close in from both sides).
  assert np.all(norms >= analytic * (1 - 1e-4))
  assert np.all(norms <= analytic * 1.02)
  # A radius below the minimum cannot succeed; restarts start at random (L2) in the ball.
  small = fab_lib.fab_attack(
    logits_fn,
    x,
    y,
    jax.random.key(0),
    eps=0.9 * float(analytic.min()),
    norm="l2",
    steps=10,
    targeted=False,
    restarts=2,
    chunk=5,
  )
  assert bool(small.robust.all())


def test_fab_targeted_l2_stays_in_the_ball():
  logits_fn, w, b = _linear_model(1)
  x = jax.random.uniform(jax.random.key(3), (8,) + SHAPE)
  y = jnp.argmax(logits_fn(x), -1)
  analytic = _boundary_distance(w, b, x, y)
  eps = float(np.median(analytic)) * 1.5
  adv = fab_lib.fab(
    logits_fn, x, y, jax.random.key(0), eps=eps, norm="l2", steps=10, n_target_classes=2, chunk=5
  )
  adv = np.asarray(adv)
  norms = _l2(adv - np.asarray(x))
  assert norms.max() <= eps + 1e-5
  assert adv.min() >= 0.0 and adv.max() <= 1.0
  broken = np.asarray(jnp.argmax(logits_fn(adv), -1)) != np.asarray(y)
  assert broken.sum() >= 4
  assert np.all(norms[broken] >= analytic[broken] * (1 - 1e-4))
  assert np.all(norms[~broken] == 0)  # unbroken points are returned clean


# ------------------------------------------------------------------------- Square-L2


def _reference_eta_rectangles(x, y):
  delta = np.zeros([x, y])
  x_c, y_c = x // 2 + 1, y // 2 + 1
  counter2 = [x_c - 1, y_c - 1]
  for counter in range(0, max(x_c, y_c)):
    delta[
      max(counter2[0], 0) : min(counter2[0] + (2 * counter + 1), x),
      max(0, counter2[1]) : min(counter2[1] + (2 * counter + 1), y),
    ] += 1.0 / (counter + 1) ** 2
    counter2[0] -= 1
    counter2[1] -= 1
  with np.errstate(invalid="ignore"):
    return delta / np.sqrt((delta**2).sum())


def _reference_eta(s, transpose=False):
  delta = np.zeros([s, s])
  delta[: s // 2] = _reference_eta_rectangles(s // 2, s)
  delta[s // 2 :] = -1.0 * _reference_eta_rectangles(s - s // 2, s)
  delta /= np.sqrt((delta**2).sum())
  return delta.T if transpose else delta


def test_meta_pseudo_gaussian_pert_matches_the_reference():
  for s in range(1, 14):
    np.testing.assert_allclose(
      square_patterns.meta_pseudo_gaussian_pert(s), _reference_eta(s), atol=1e-12, err_msg=str(s)
    )


def test_l2_square_sizes():
  # max(round(sqrt(p * 1024)), 3), made odd: 28.6 -> 29, 20.2 -> 21, 14.3 -> 15, 10.1 -> 11,
  # 7.2 -> 7, 5.06 -> 5, 3.58 -> 5, 2.53 -> 3.
  sizes = square_lib.square_sizes(32, 32, 5000, norm="l2")
  assert [int(sizes[i]) for i in (0, 11, 51, 201, 501, 1001, 2001, 4001)] == [
    29,
    21,
    15,
    11,
    7,
    5,
    5,
    3,
  ]
  # Capped at the image after the odd rule: 4x4 -> 4 (round(3.58) = 4 -> 5 -> 4), then 3.
  assert [int(v) for v in square_lib.square_sizes(4, 4, 12, norm="l2")[[0, 11]]] == [4, 3]


@pytest.mark.parametrize("side", [16, 28, 32])
def test_l2_start_tiles_match_the_reference_grid(side):
  h = w = side
  s = h // 5
  expected = np.zeros((h, w))
  expected_t = np.zeros((h, w))
  sp_init = (h - s * 5) // 2
  vh = sp_init
  for _ in range(h // s):
    vw = sp_init
    for _ in range(w // s):
      expected[vh : vh + s, vw : vw + s] += _reference_eta(s)
      expected_t[vh : vh + s, vw : vw + s] += _reference_eta(s, transpose=True)
      vw += s
    vh += s
  tiles, plain, flipped = square_lib.l2_start_tiles(h, w)
  assert tiles.sum(0).max() == 1  # disjoint
  np.testing.assert_allclose((tiles * plain).sum(0), expected, atol=1e-6)
  np.testing.assert_allclose((tiles * flipped).sum(0), expected_t, atol=1e-6)


def _reference_l2_query(x, x_best, eps, s, corners, transpose, signs):
  """One L2 query of the reference ``attack_single_run`` for one example, NCHW float64."""
  c, h, w = x.shape
  vh, vw, vh2, vw2 = corners
  delta_curr = x_best - x
  norms_window_1 = np.sqrt(
    (delta_curr[:, vh : vh + s, vw : vw + s] ** 2).sum((-2, -1), keepdims=True)
  )
  mask = np.zeros_like(x)
  mask[:, vh : vh + s, vw : vw + s] = 1.0
  mask_2 = np.zeros_like(x)
  mask_2[:, vh2 : vh2 + s, vw2 : vw2 + s] = 1.0
  norms_image = np.sqrt(((x_best - x) ** 2).sum())
  mask_image = np.maximum(mask, mask_2)
  norms_windows = np.sqrt(((delta_curr * mask_image) ** 2).sum((-2, -1), keepdims=True))
  new_deltas = np.ones([c, s, s]) * (_reference_eta(s, transpose)[None] * signs[:, None, None])
  new_deltas += delta_curr[:, vh : vh + s, vw : vw + s] / (1e-12 + norms_window_1)
  new_deltas = (
    new_deltas
    / (1e-12 + np.sqrt((new_deltas**2).sum((-2, -1), keepdims=True)))
    * (np.sqrt(np.maximum(eps**2 - norms_image**2, 0) / c + norms_windows**2))
  )
  delta_curr[:, vh2 : vh2 + s, vw2 : vw2 + s] = 0.0
  delta_curr[:, vh : vh + s, vw : vw + s] = new_deltas
  normalised = delta_curr / (np.sqrt((delta_curr**2).sum()) + 1e-12)
  return np.clip(x + normalised * eps, 0.0, 1.0)


@pytest.mark.parametrize("side", [3, 4, 5])
def test_l2_square_query_matches_the_reference(side):
  batch, height, width, channels = 6, 10, 8, 3
  dim = height * width * channels
  logits_fn, _, _ = _linear_model(2, dim)
  key = jax.random.key(side)
  x0 = jax.random.uniform(key, (batch, height, width, channels))
  y = jnp.argmax(logits_fn(x0), -1)
  eps = 1.5
  start = jax.random.normal(jax.random.fold_in(key, 1), x0.shape)
  start = start * (jax.random.uniform(jax.random.fold_in(key, 2), x0.shape) < 0.5)
  x_best = jnp.clip(x0 + eps * runner_lib.normalize(start, "l2"), 0.0, 1.0)
  # Margin and loss "infinite": every example is active and accepts the candidate.
  state = square_lib.SquareState(
    x_best=x_best,
    margin=jnp.full((batch,), 1e9),
    loss=jnp.full((batch,), 1e9),
    queries=jnp.ones(batch, jnp.int32),
    it=jnp.zeros((), jnp.int32),
    key=jax.random.key(0),
  )
  sizes = np.asarray([side], np.int32)
  patterns, index = square_lib._l2_patterns(sizes)
  uniforms = jax.random.uniform(jax.random.fold_in(key, 3), (1, batch, 5))
  signs = jax.random.rademacher(jax.random.fold_in(key, 4), (1, batch, channels), jnp.int8)
  step = square_lib._step_rule_l2("margin", False)
  out = step(
    logits_fn,
    x0,
    y,
    jnp.float32(eps),
    jnp.asarray(sizes),
    jnp.asarray(index),
    jnp.asarray(patterns),
    uniforms,
    signs,
    state,
  )
  assert int(out.it) == 1 and np.all(np.asarray(out.queries) == 2)

  u = np.asarray(uniforms[0], np.float64)
  for i in range(batch):
    corners = [
      int(np.floor(np.float32(u[i, k]) * np.float32(room)))
      for k, room in enumerate([height - side, width - side] * 2)
    ]
    expected = _reference_l2_query(
      np.asarray(x0[i], np.float64).transpose(2, 0, 1),
      np.asarray(x_best[i], np.float64).transpose(2, 0, 1),
      eps,
      side,
      corners,
      bool(u[i, 4] > 0.5),
      np.asarray(signs[0, i], np.float64),
    )
    np.testing.assert_allclose(
      np.asarray(out.x_best[i]).transpose(2, 0, 1), expected, atol=2e-5, err_msg=f"example {i}"
    )


def test_l2_square_stays_in_the_ball_and_keeps_its_bookkeeping():
  logits_fn, _, _ = _linear_model(2)
  x = jax.random.uniform(jax.random.key(4), (16,) + SHAPE)
  y = jnp.argmax(logits_fn(x), -1)
  eps = 0.5
  result = square_lib.square_attack(
    logits_fn, x, y, jax.random.key(0), eps=eps, norm="l2", n_queries=40, chunk=5
  )
  adv = np.asarray(result.adversarial)
  assert adv.min() >= 0.0 and adv.max() <= 1.0
  assert _l2(adv - np.asarray(x)).max() <= eps + 1e-5
  margin = -losses.margin(logits_fn(adv), y)
  keys = runner_lib.fold_in_each(runner_lib.example_keys(jax.random.key(0), 16), 0)
  start = square_lib._init_rule("margin", False, "l2")(
    logits_fn, x, y, jnp.float32(eps), runner_lib.split_each(keys)[0]
  )
  assert _l2(start.x_best - x).max() <= eps + 1e-5
  assert bool(jnp.all(margin <= start.margin + 1e-5))
  assert bool(jnp.all((margin > 0) == result.robust))
  assert 0 < int(result.robust.sum()) < 16  # a case that can tell


def test_l2_square_breaks_a_non_robust_model():
  logits_fn, w, b = _linear_model(3)
  x = jax.random.uniform(jax.random.key(5), (16,) + SHAPE)
  y = jnp.argmax(logits_fn(x), -1)
  eps = 1.0  # about 5x the median distance to the boundary
  assert eps >= 4 * np.median(_boundary_distance(w, b, x, y))
  result = square_lib.square_attack(
    logits_fn, x, y, jax.random.key(0), eps=eps, norm="l2", n_queries=200, chunk=5
  )
  adv = np.asarray(result.adversarial)
  assert np.mean(np.asarray(jnp.argmax(logits_fn(adv), -1)) == np.asarray(y)) <= 2 / 16
  assert _l2(adv - np.asarray(x)).max() <= eps + 1e-5
  # A larger radius breaks every point and stops early.
  wide = square_lib.square_attack(
    logits_fn, x, y, jax.random.key(0), eps=2.0, norm="l2", n_queries=200, chunk=5
  )
  assert not bool(wide.robust.any()) and int(wide.queries.max()) < 200


def test_l2_loop_driver_matches_host_driver():
  logits_fn, _, _ = _linear_model(4)
  x = jax.random.uniform(jax.random.key(6), (8,) + SHAPE)
  y = jnp.argmax(logits_fn(x), -1)
  key = jax.random.key(0)
  runs = {
    "fab": lambda d: (
      fab_lib.fab_attack(
        logits_fn, x, y, key, eps=0.5, norm="l2", steps=4, targeted=False, driver=d, chunk=2
      ).adversarial
    ),
    "square": lambda d: (
      square_lib.square_attack(
        logits_fn, x, y, key, eps=0.5, norm="l2", n_queries=10, driver=d, chunk=5, check_every=5
      ).adversarial
    ),
  }
  for name, run in runs.items():
    np.testing.assert_allclose(run("loop"), run("host"), atol=1e-6, err_msg=name)


# --------------------------------------------------------------------- AutoAttack-L2


def _mlp(w1, w2, x):
  return jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2


def test_autoattack_l2_runs_all_four_stages_and_is_a_worst_case():
  rng = np.random.RandomState(0)
  logits_fn = Partial(
    _mlp,
    jnp.asarray(rng.randn(DIM, 32).astype(np.float32)),
    jnp.asarray(rng.randn(32, CLASSES).astype(np.float32)),
  )
  x = np.asarray(jax.random.uniform(jax.random.key(1), (16,) + SHAPE))
  y = np.asarray(jnp.argmax(logits_fn(jnp.asarray(x)), -1))
  eps = 0.1
  kwargs = dict(
    steps=4,
    square_queries=20,
    n_target_classes=2,
    batch_size=16,
    min_bucket=16,
    chunk=1,
    square_chunk=2,
  )
  res = aa.autoattack(logits_fn, x, y, jax.random.key(0), eps=eps, norm="l2", **kwargs)
  assert list(res["per_attack"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
  values = [res["clean_accuracy"]] + list(res["per_attack"].values())
  assert all(a >= b for a, b in zip(values, values[1:]))
  assert 0.0 < res["robust_accuracy"] < res["clean_accuracy"]  # a case that can tell
  assert res["per_attack"]["apgd-t"] > 0  # so FAB-T and Square had points to attack
  adv, robust = res["adversarial"], res["robust"]
  assert _l2(adv - x).max() <= eps + 1e-5 and adv.min() >= 0.0 and adv.max() <= 1.0
  pred = np.asarray(jnp.argmax(logits_fn(jnp.asarray(adv)), -1))
  assert np.all(pred[~robust] != y[~robust])
  np.testing.assert_array_equal(adv[robust], x[robust])

  # Each component alone (the same settings, through AutoAttack's custom version so that
  # it is verified the same way) is never stronger than the ensemble.
  for name in ("apgd-ce", "apgd-t", "fab-t", "square"):
    alone = aa.autoattack(
      logits_fn,
      x,
      y,
      jax.random.key(0),
      eps=eps,
      norm="l2",
      version="custom",
      attacks=[name],
      **kwargs,
    )
    assert res["robust_accuracy"] <= alone["robust_accuracy"], name
  with pytest.raises(ValueError, match="norm"):
    aa.autoattack(logits_fn, x, y, jax.random.key(0), eps=eps, norm="l1")
