"""PGD / FGSM: projection, analytic optimum on a linear model, drivers, losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from agad import attacks

H, W, C = 4, 4, 1


def _linear_logits(w, b, x):
  """Binary linear model: logits [-s, s] with s = <w, x> + b."""
  s = x.reshape(x.shape[0], -1) @ w + b
  return jnp.stack([-s, s], -1)


def _model(seed=0):
  w = jnp.asarray(np.random.RandomState(seed).randn(H * W * C), jnp.float32)
  return w, Partial(_linear_logits, w, jnp.float32(0.1))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_project_stays_in_ball_and_box(norm):
  k1, k2 = jax.random.split(jax.random.key(0))
  x0 = jax.random.uniform(k1, (5, H, W, C))
  x = x0 + 3.0 * jax.random.normal(k2, x0.shape)
  eps = jnp.array([0.0, 0.01, 0.1, 0.5, 2.0])
  p = attacks.project(x, x0, eps, norm)
  assert float(p.min()) >= 0.0 and float(p.max()) <= 1.0
  d = (p - x0).reshape(5, -1)
  size = jnp.abs(d).max(1) if norm == "linf" else jnp.linalg.norm(d, axis=1)
  assert np.all(np.asarray(size) <= np.asarray(eps) + 1e-6)
  # Projection is idempotent.
  np.testing.assert_allclose(attacks.project(p, x0, eps, norm), p, atol=1e-6)


@pytest.mark.parametrize("driver", ["unroll", "loop", "host"])
def test_pgd_linf_reaches_analytic_optimum_of_linear_model(driver):
  w, logits_fn = _model()
  # Mid-range pixels (no box clipping) and pixels near the box edge (clipping binds).
  x = jnp.concatenate([jnp.full((2, H, W, C), 0.5), jnp.full((2, H, W, C), 0.97)])
  y = jnp.array([1, 0, 1, 0])
  eps = 0.1
  adv = attacks.pgd(
    logits_fn, x, y, jax.random.key(1), eps=eps, step_size=0.04, steps=5, driver=driver
  )
  # CE of class y grows as the margin toward y shrinks: move against y's direction.
  direction = jnp.where(y == 1, -1.0, 1.0)[:, None, None, None] * jnp.sign(w).reshape(1, H, W, C)
  expected = jnp.clip(x + eps * direction, 0.0, 1.0)
  np.testing.assert_allclose(adv, expected, atol=1e-6)


def test_pgd_l2_reaches_analytic_optimum_of_linear_model():
  w, logits_fn = _model(1)
  x = jnp.full((2, H, W, C), 0.5)
  y = jnp.array([1, 0])
  eps = 0.3
  adv = attacks.pgd(
    logits_fn,
    x,
    y,
    jax.random.key(0),
    eps=eps,
    step_size=0.1,
    steps=10,
    norm="l2",
    random_start="none",
  )
  unit = (w / jnp.linalg.norm(w)).reshape(1, H, W, C)
  expected = x + eps * jnp.where(y == 1, -1.0, 1.0)[:, None, None, None] * unit
  np.testing.assert_allclose(adv, expected, atol=1e-5)


def test_targeted_descends_toward_target_and_per_example_eps():
  w, logits_fn = _model(2)
  x = jnp.full((3, H, W, C), 0.5)
  targets = jnp.array([1, 0, 1])
  eps = jnp.array([0.0, 0.05, 0.2])
  adv = attacks.pgd(
    logits_fn,
    x,
    targets,
    jax.random.key(0),
    eps=eps,
    step_size=0.1,
    steps=3,
    targeted=True,
    random_start="none",
  )
  direction = jnp.where(targets == 1, 1.0, -1.0)[:, None, None, None] * jnp.sign(w).reshape(
    1, H, W, C
  )
  np.testing.assert_allclose(adv, x + eps[:, None, None, None] * direction, atol=1e-6)


def test_drivers_agree_and_random_start_is_in_ball():
  _, logits_fn = _model(3)
  x = jax.random.uniform(jax.random.key(4), (6, H, W, C))
  y = jnp.array([0, 1, 0, 1, 0, 1])
  kw = dict(eps=0.05, step_size=0.01, steps=3, loss="margin")
  outs = [
    attacks.pgd(logits_fn, x, y, jax.random.key(5), driver=d, **kw)
    for d in ("unroll", "loop", "host")
  ]
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-6)
  np.testing.assert_allclose(outs[0], outs[2], atol=1e-6)
  start = attacks.pgd_init(jax.random.key(6), x, eps=0.05).x
  assert float(jnp.abs(start - x).max()) <= 0.05 + 1e-6
  assert float(jnp.abs(start - x).max()) > 0.0


def test_pgd_is_jittable_and_stops_gradient():
  _, logits_fn = _model(4)
  x = jnp.full((2, H, W, C), 0.5)
  y = jnp.array([0, 1])
  f = lambda x: jnp.sum(
    attacks.pgd(logits_fn, x, y, jax.random.key(0), eps=0.1, step_size=0.05, steps=2)
  )
  assert float(jnp.abs(jax.grad(f)(x)).sum()) == 0.0
  np.testing.assert_allclose(jax.jit(f)(x), f(x), rtol=1e-6)


def test_fgsm_is_one_sign_step_from_clean():
  w, logits_fn = _model(5)
  x = jnp.full((2, H, W, C), 0.5)
  y = jnp.array([1, 0])
  adv = attacks.fgsm(logits_fn, x, y, jax.random.key(0), eps=0.03)
  direction = jnp.where(y == 1, -1.0, 1.0)[:, None, None, None] * jnp.sign(w).reshape(1, H, W, C)
  np.testing.assert_allclose(adv, x + 0.03 * direction, atol=1e-6)


def test_losses_hand_computed():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
  labels = jnp.array([0, 0])
  lse = np.log(np.exp([2.0, 0.0, -1.0]).sum())
  np.testing.assert_allclose(attacks.cross_entropy(logits, labels)[0], lse - 2.0, rtol=1e-6)
  # Label smoothing 0.3 over 3 classes: target (0.8, 0.1, 0.1).
  logp = np.array([2.0, 0.0, -1.0]) - lse
  np.testing.assert_allclose(
    attacks.cross_entropy(logits, labels, label_smoothing=0.3)[0],
    -(0.8 * logp[0] + 0.1 * logp[1] + 0.1 * logp[2]),
    rtol=1e-6,
  )
  np.testing.assert_allclose(attacks.margin(logits, labels), [-2.0, 1.0])
  np.testing.assert_allclose(attacks.margin(logits, labels, kappa=0.5), [-2.0, 0.5])
  p = jax.nn.softmax(logits[1])
  np.testing.assert_allclose(attacks.kl_divergence(p[None], logits[1:])[0], 0.0, atol=1e-7)
  q = jnp.array([[1.0, 0.0, 0.0]])
  np.testing.assert_allclose(attacks.kl_divergence(q, logits[:1])[0], -logp[0], rtol=1e-6)


def test_kl_attack_from_normal_start_increases_kl():
  _, logits_fn = _model(6)
  x = jax.random.uniform(jax.random.key(7), (4, H, W, C), minval=0.2, maxval=0.8)
  y = jnp.zeros(4, jnp.int32)
  adv = attacks.pgd(
    logits_fn,
    x,
    y,
    jax.random.key(8),
    eps=0.1,
    step_size=0.02,
    steps=5,
    loss="kl",
    random_start="normal",
  )
  p = jax.nn.softmax(logits_fn(x))
  assert np.all(np.asarray(attacks.kl_divergence(p, logits_fn(adv))) > 1e-4)


def test_stochastic_logits_fn_gets_fresh_keys():
  seen = []

  def noisy(x, key):
    seen.append(key)
    return _linear_logits(jnp.ones(H * W * C), 0.0, x + 0.01 * jax.random.normal(key, x.shape))

  x = jnp.full((2, H, W, C), 0.5)
  attacks.pgd(
    noisy,
    x,
    jnp.array([0, 1]),
    jax.random.key(0),
    eps=0.1,
    step_size=0.05,
    steps=2,
    stochastic=True,
    driver="unroll",
  )
  assert len(seen) == 2


def test_bad_arguments_are_named():
  _, logits_fn = _model()
  x = jnp.full((2, H, W, C), 0.5)
  with pytest.raises(ValueError, match="norm 'l3'"):
    attacks.pgd(
      logits_fn, x, jnp.array([0, 1]), jax.random.key(0), eps=0.1, step_size=0.1, steps=1, norm="l3"
    )
  with pytest.raises(ValueError, match="loss 'hinge'"):
    attacks.pgd(
      logits_fn,
      x,
      jnp.array([0, 1]),
      jax.random.key(0),
      eps=0.1,
      step_size=0.1,
      steps=1,
      loss="hinge",
    )
  with pytest.raises(ValueError, match="labels shape"):
    attacks.pgd(
      logits_fn, x, jnp.array([0, 1, 1]), jax.random.key(0), eps=0.1, step_size=0.1, steps=1
    )
  with pytest.raises(ValueError, match="driver"):
    attacks.pgd(
      logits_fn,
      x,
      jnp.array([0, 1]),
      jax.random.key(0),
      eps=0.1,
      step_size=0.1,
      steps=1,
      driver="gpu",
    )


def test_bim_is_pgd_from_clean_image():
  w, logits_fn = _model(6)
  x = jax.random.uniform(jax.random.key(7), (3, H, W, C))
  y = jnp.array([0, 1, 0])
  kw = dict(eps=0.05, step_size=0.02, steps=4)
  np.testing.assert_allclose(
    attacks.bim(logits_fn, x, y, jax.random.key(1), **kw),
    attacks.pgd(logits_fn, x, y, jax.random.key(2), random_start="none", **kw),
    atol=1e-7,
  )


def test_mim_reaches_linear_optimum_and_keeps_ball():
  w, logits_fn = _model(8)
  x = jnp.concatenate([jnp.full((2, H, W, C), 0.5), jnp.full((2, H, W, C), 0.97)])
  y = jnp.array([1, 0, 1, 0])
  adv = attacks.mim(logits_fn, x, y, jax.random.key(0), eps=0.1, steps=10)
  direction = jnp.where(y == 1, -1.0, 1.0)[:, None, None, None] * jnp.sign(w).reshape(1, H, W, C)
  # Default step eps / steps: ten sign steps along a fixed direction land on the corner.
  np.testing.assert_allclose(adv, jnp.clip(x + 0.1 * direction, 0.0, 1.0), atol=1e-6)
  adv2 = attacks.mim(logits_fn, x, y, jax.random.key(0), eps=0.1, steps=10, norm="l2")
  assert np.all(np.linalg.norm(np.asarray(adv2 - x).reshape(4, -1), axis=1) <= 0.1 + 1e-5)


def test_mim_velocity_matches_hand_computation():
  """Two steps on a quadratic per-example loss, against the update rule written in NumPy."""
  target = jax.random.uniform(jax.random.key(3), (2, H, W, C))
  weights = jnp.linspace(0.5, 2.0, H * W * C).reshape(1, H, W, C)
  loss_fn = lambda x: -jnp.sum(weights * (x - target) ** 2, axis=(1, 2, 3))
  x0 = jnp.full((2, H, W, C), 0.5)
  mu, a, eps = 0.7, 0.03, 0.05
  step = attacks.iterative._mim_rule("linf", False, False)
  state = attacks.MIMState(x=x0, velocity=jnp.zeros_like(x0), key=jax.random.key(0))
  for _ in range(2):
    state = step(loss_fn, x0, jnp.float32(eps), jnp.float32(a), jnp.float32(mu), state)
  xn, v = np.asarray(x0), np.zeros(x0.shape, np.float32)
  for _ in range(2):
    g = -2.0 * np.asarray(weights) * (xn - np.asarray(target))
    v = mu * v + g / np.abs(g).reshape(2, -1).sum(1).reshape(2, 1, 1, 1)
    xn = np.clip(np.clip(xn + a * np.sign(v), 0.5 - eps, 0.5 + eps), 0, 1)
  np.testing.assert_allclose(state.velocity, v, rtol=1e-5)
  np.testing.assert_allclose(state.x, xn, atol=1e-6)


@pytest.mark.parametrize("driver", ["loop", "host"])
def test_eager_drivers_trace_the_step_once_for_new_arrays(driver):
  """Outside jit, the loop and host drivers compile once per step function: a second
  call with new arrays (same shapes) must not re-trace the step (an eager fori_loop
  re-traced and re-compiled on every call)."""
  from agad.attacks import driver as driver_lib

  traces = []

  def step_fn(scale, state):
    traces.append(1)  # Runs only while tracing.
    return state * scale

  step = Partial(step_fn, jnp.float32(0.5))
  out = driver_lib.iterate(step, jnp.ones(3), 4, driver=driver, chunk=4)
  np.testing.assert_allclose(out, np.full(3, 0.5**4))
  n = len(traces)
  out = driver_lib.iterate(
    Partial(step_fn, jnp.float32(2.0)), jnp.full(3, 3.0, jnp.float32), 4, driver=driver, chunk=4
  )
  np.testing.assert_allclose(out, np.full(3, 3.0 * 2.0**4))
  assert len(traces) == n, f"driver={driver} re-traced the step on a second call"


def _band_logits(x):
  """Three classes on t = mean(x): class 1 wins only for |t - 0.55| < 0.02, class 0 elsewhere;
  class 2 (never the argmax) rises with t, so ascending its logit walks t through the band."""
  t = jnp.mean(x.reshape(x.shape[0], -1), axis=1)
  return jnp.stack([jnp.zeros_like(t), 1.0 - 2500.0 * (t - 0.55) ** 2, 100.0 * t - 1000.0], -1)


@pytest.mark.parametrize("driver", ["unroll", "loop", "host"])
@pytest.mark.parametrize("attack", ["pgd", "mim"])
def test_track_best_keeps_a_misclassified_earlier_iterate(driver, attack):
  # t: 0.50 -> 0.52, 0.54, 0.56 (misclassified), 0.58, 0.60 (correct again, the last iterate).
  x = jnp.full((2, H, W, C), 0.5)
  y = jnp.zeros(2, jnp.int32)
  ascend_class_2 = lambda logits, labels: logits[:, 2]
  kw = dict(eps=0.1, steps=5, loss=ascend_class_2, driver=driver, chunk=2)
  if attack == "pgd":
    run = lambda **extra: attacks.pgd(
      Partial(_band_logits),
      x,
      y,
      jax.random.key(0),
      step_size=0.02,
      random_start="none",
      **kw,
      **extra,
    )
  else:
    run = lambda **extra: attacks.mim(Partial(_band_logits), x, y, jax.random.key(0), **kw, **extra)
  last = run()
  np.testing.assert_allclose(last, jnp.full_like(x, 0.6), atol=1e-6)
  assert np.all(np.asarray(jnp.argmax(_band_logits(last), -1)) == 0)  # the last iterate is correct
  best = run(track_best=True)
  np.testing.assert_allclose(best, jnp.full_like(x, 0.56), atol=1e-6)  # the last misclassified one
  assert np.all(np.asarray(jnp.argmax(_band_logits(best), -1)) == 1)


def test_track_best_returns_the_final_iterate_when_it_is_adversarial():
  w, logits_fn = _model()
  x = jax.random.uniform(jax.random.key(3), (8, H, W, C))
  y = jnp.asarray(np.random.RandomState(0).randint(0, 2, 8))
  kw = dict(eps=0.1, step_size=0.03, steps=6, loss="margin")
  plain = attacks.pgd(logits_fn, x, y, jax.random.key(4), **kw)
  tracked = attacks.pgd(logits_fn, x, y, jax.random.key(4), track_best=True, **kw)
  # A linear model's loss only grows along the path: the last iterate is the best one.
  np.testing.assert_allclose(tracked, plain, atol=1e-6)
  success = lambda z: jnp.argmax(logits_fn(z), -1) != y
  general = attacks.pgd_general(
    Partial(lambda z: attacks.margin(logits_fn(z), y)),
    x,
    jax.random.key(4),
    success_fn=success,
    eps=0.1,
    step_size=0.03,
    steps=6,
  )
  np.testing.assert_allclose(general, plain, atol=1e-6)
