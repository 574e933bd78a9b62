"""AutoAttack: worst case over its attacks, re-verification, masking, compile budget."""

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
aa = importlib.import_module("agad.attacks.autoattack")
fab_lib = importlib.import_module("agad.attacks.fab")
square_lib = importlib.import_module("agad.attacks.square")

SHAPE = (4, 4, 3)
DIM = 48
CLASSES = 10


def _mlp(w1, w2, x):
  return jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2


def _quantised_linear(w, b, x):
  # Input quantisation with no straight-through gradient: every input gradient is 0.
  q = jax.lax.stop_gradient(jnp.round(x * 8) / 8)
  return q.reshape(q.shape[0], -1) @ w + b


def _bucket_model(w1, w2, x):  # used by the compile-count test only (fresh jit caches)
  return jnp.tanh(x.reshape(x.shape[0], -1) @ w1) @ w2


def _weights(seed, hidden=32):
  rng = np.random.RandomState(seed)
  return (
    jnp.asarray(rng.randn(DIM, hidden).astype(np.float32)),
    jnp.asarray(rng.randn(hidden, CLASSES).astype(np.float32)),
  )


def _images(n, seed):
  return np.asarray(jax.random.uniform(jax.random.key(seed), (n,) + SHAPE))


def _robust_accuracy(logits_fn, x_adv, x, y, eps):
  wrong = np.asarray(jnp.argmax(logits_fn(jnp.asarray(x_adv)), -1)) != y
  inside = np.abs(np.asarray(x_adv) - x).reshape(len(x), -1).max(1) <= eps + 1e-6
  return float(np.mean(~(wrong & inside)))


def test_bucket_sizes():
  assert aa.bucket_sizes(250) == [
    250,
    224,
    192,
    160,
    128,
    112,
    96,
    80,
    64,
    56,
    48,
    40,
    32,
    28,
    24,
    20,
    16,
    14,
    12,
    10,
    8,
  ]
  assert aa.bucket_sizes(250, per_octave=1) == [250, 128, 64, 32, 16, 8]
  assert aa.bucket_sizes(16, min_bucket=4) == [16, 14, 12, 10, 8, 7, 6, 5, 4]
  assert aa.bucket_sizes(5, min_bucket=8) == [5]
  # Padding is below a quarter of the batch from min_bucket up (131 rows: 160, not 250).
  sizes = aa.bucket_sizes(250)
  assert runner_lib.bucket_for(131, sizes) == 160
  assert all(runner_lib.bucket_for(m, sizes) < 1.25 * m for m in range(8, 251))


def test_padded_batches_pad_with_a_real_row_to_the_smallest_bucket():
  sizes = runner_lib.bucket_sizes(16, min_bucket=4, per_octave=1)
  batches = list(runner_lib.padded_batches(np.arange(100, 121), 16, sizes))
  assert [(start, len(real), len(padded)) for start, real, padded, _ in batches] == [
    (0, 16, 16),
    (16, 5, 8),
  ]
  _, real, padded, valid = batches[1]
  np.testing.assert_array_equal(real, [116, 117, 118, 119, 120])
  np.testing.assert_array_equal(padded, [116, 117, 118, 119, 120, 116, 116, 116])
  np.testing.assert_array_equal(valid, [True] * 5 + [False] * 3)


def test_verification_rejects_candidates_outside_the_threat_model():
  w = jnp.zeros((DIM, CLASSES)).at[:, 1].set(1.0)  # class 1 wins as soon as sum(x) > 0
  logits_fn = Partial(lambda w, x: x.reshape(x.shape[0], -1) @ w, w)
  x0 = jnp.zeros((5,) + SHAPE)
  y = jnp.zeros((5,), jnp.int32)
  eps = 0.1
  candidates = jnp.stack(
    [
      x0[0] + eps,  # misclassified, on the ball's edge: accepted
      x0[1] + 2 * eps,  # misclassified but outside the ball
      x0[2] - eps + 0.5,  # misclassified but outside the ball
      x0[3].at[0, 0, 0].set(jnp.nan),  # not finite
      x0[4],  # inside, but still correct
    ]
  )
  ok, _ = aa._verify(
    logits_fn, x0, candidates, y, jnp.float32(eps), jax.random.key(0), False, "linf"
  )
  np.testing.assert_array_equal(ok, [True, False, False, False, False])
  x1 = jnp.full((1,) + SHAPE, 0.95)
  ok, _ = aa._verify(
    logits_fn,
    x1,
    x1 + 0.08,
    jnp.zeros((1,), jnp.int32),
    jnp.float32(eps),
    jax.random.key(0),
    False,
    "linf",
  )
  assert not bool(ok[0])  # inside the ball but outside [0, 1]


@pytest.mark.slow
def test_standard_is_a_verified_worst_case_over_its_attacks():
  logits_fn = Partial(_mlp, *_weights(0))
  x = _images(32, 1)
  y = np.array(jnp.argmax(logits_fn(jnp.asarray(x)), -1))
  y[:2] = (y[:2] + 1) % CLASSES  # two clean mistakes: never attacked
  eps = 0.04
  res = aa.autoattack(
    logits_fn,
    x,
    y,
    jax.random.key(0),
    eps=eps,
    steps=10,
    square_queries=100,
    batch_size=32,
    min_bucket=32,
  )

  assert list(res["per_attack"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
  values = [res["clean_accuracy"]] + list(res["per_attack"].values())
  assert all(a >= b for a, b in zip(values, values[1:]))
  assert res["clean_accuracy"] == pytest.approx(30 / 32)
  assert res["robust_accuracy"] == pytest.approx(float(res["robust"].mean()))
  assert list(res["per_attack"].values())[-1] == pytest.approx(float(res["robust"].mean()))
  assert 0.0 < res["robust_accuracy"] < res["clean_accuracy"]  # a case that can tell
  robust, adv = res["robust"], res["adversarial"]
  assert robust.dtype == bool and robust.shape == (32,)
  assert adv.dtype == np.float32 and adv.shape == x.shape
  assert not robust[:2].any() and list(res["broken_by"][:2]) == ["clean", "clean"]
  np.testing.assert_array_equal(adv[robust], x[robust])
  np.testing.assert_array_equal(adv[:2], x[:2])
  broken = ~robust
  broken[:2] = False
  assert broken.any()
  pred = np.asarray(jnp.argmax(logits_fn(jnp.asarray(adv)), -1))
  assert np.all(pred[broken] != y[broken])
  assert np.abs(adv - x).reshape(32, -1).max(1)[broken].max() <= eps + 1e-6
  assert adv.min() >= 0.0 and adv.max() <= 1.0

  # Each component alone (same budget) is no stronger than the ensemble.
  xj, yj = jnp.asarray(x), jnp.asarray(y)
  alone = {
    "apgd-ce": apgd_lib.apgd(logits_fn, xj, yj, jax.random.key(1), eps=eps, steps=10),
    "apgd-t": apgd_lib.apgd_targeted(logits_fn, xj, yj, jax.random.key(2), eps=eps, steps=10),
    "fab-t": fab_lib.fab(logits_fn, xj, yj, jax.random.key(3), eps=eps, steps=10),
    "square": square_lib.square(logits_fn, xj, yj, jax.random.key(4), eps=eps, n_queries=100),
  }
  for name, x_adv in alone.items():
    assert res["robust_accuracy"] <= _robust_accuracy(logits_fn, x_adv, x, y, eps), name


def test_masked_gradients_defeat_apgd_but_not_square():
  rng = np.random.RandomState(0)
  logits_fn = Partial(
    _quantised_linear,
    jnp.asarray(rng.randn(DIM, CLASSES).astype(np.float32)),
    jnp.asarray(rng.randn(CLASSES).astype(np.float32)),
  )
  x = _images(32, 1)
  y = np.asarray(jnp.argmax(logits_fn(jnp.asarray(x)), -1))
  eps = 0.2
  alone = apgd_lib.apgd(
    logits_fn, jnp.asarray(x), jnp.asarray(y), jax.random.key(0), eps=eps, steps=10
  )
  assert _robust_accuracy(logits_fn, alone, x, y, eps) >= 0.9
  res = aa.autoattack(
    logits_fn,
    x,
    y,
    jax.random.key(1),
    eps=eps,
    version="custom",
    attacks=["apgd-ce", "apgd-t", "square"],
    steps=10,
    square_queries=300,
    batch_size=32,
    min_bucket=32,
  )
  assert res["per_attack"]["apgd-t"] >= 0.9
  assert res["per_attack"]["square"] <= 0.4
  # Distinct points are counted once, though APGD-CE and every APGD-T target saw them.
  zero = [f for f in res["flags"] if "zero input gradient" in f]
  assert zero and int(zero[0].split()[0]) == int(round(32 * res["clean_accuracy"]))
  assert any("Square lowered" in f for f in res["flags"])


@pytest.mark.slow
def test_one_compile_per_bucket_size_and_none_on_a_second_run():
  logits_fn = Partial(_bucket_model, *_weights(5, hidden=16))
  y_of = lambda x: np.asarray(jnp.argmax(logits_fn(jnp.asarray(x)), -1))
  chunk, square_chunk = 3, 10
  kwargs = dict(
    eps=0.03,
    steps=6,
    square_queries=20,
    batch_size=16,
    min_bucket=8,
    chunk=chunk,
    square_chunk=square_chunk,
    n_target_classes=2,
  )
  before = dict(runner_lib.TRACE_COUNTS)
  x = _images(24, 7)
  res = aa.autoattack(logits_fn, x, y_of(x), jax.random.key(0), **kwargs)
  new = {
    k: v - before.get(k, 0) for k, v in runner_lib.TRACE_COUNTS.items() if v != before.get(k, 0)
  }
  assert new, "no step was traced"
  expected = {"apgd-ce": chunk, "apgd-dlr-targeted": chunk, "fab-t": chunk, "square": square_chunk}
  for (tag, batch), traces in new.items():
    assert batch in aa.bucket_sizes(16, min_bucket=8), (tag, batch)
    # One compiled chunk of `chunk` unrolled steps per (attack, bucket): a recompile
    # (new shapes, a new closure, a changed step function) would double the count.
    assert traces == expected[tag], (tag, batch, traces)
  assert len({batch for _, batch in new}) >= 2  # the shrinking set used several buckets
  assert 0.0 < res["robust_accuracy"] < 1.0

  snapshot = dict(runner_lib.TRACE_COUNTS)
  x2 = _images(24, 8)
  aa.autoattack(logits_fn, x2, y_of(x2), jax.random.key(1), **kwargs)
  second = {
    k: v - snapshot.get(k, 0) for k, v in runner_lib.TRACE_COUNTS.items() if v != snapshot.get(k, 0)
  }
  for (tag, batch), traces in second.items():
    # A second evaluation reuses every compiled (attack, bucket); only a bucket size
    # the first run did not need may compile, once.
    assert (tag, batch) not in new and traces == expected[tag], (tag, batch, traces)


def _gradient_noise(w1, w2, c, x, key):
  """The MLP plus a term whose value is at most c / 1000 but whose input gradient is c times
  a fresh Gaussian direction per call: single-draw gradients are noise, their mean is not."""
  flat = x.reshape(x.shape[0], -1)
  r = jax.random.normal(key, (flat.shape[1], CLASSES))
  return _mlp(w1, w2, x) + (c / 1e3) * jnp.sin(1e3 * flat @ r)


@pytest.mark.slow
def test_rand_version_uses_eot_on_a_stochastic_model():
  w1, w2 = _weights(3)
  x = _images(16, 2)
  y = np.asarray(jnp.argmax(_mlp(w1, w2, jnp.asarray(x)), -1))
  noisy = Partial(_gradient_noise, w1, w2, 30.0)
  kw = dict(eps=0.06, version="rand", stochastic=True, steps=10, batch_size=16, min_bucket=16)
  res = aa.autoattack(noisy, x, y, jax.random.key(0), eot_iter=8, **kw)
  assert list(res["per_attack"]) == ["apgd-ce", "apgd-dlr"]
  assert res["clean_accuracy"] == 1.0
  assert res["robust_accuracy"] <= 0.2
  # The same attack without EOT is defeated by the noise: the test above needs EOT to pass.
  without = aa.autoattack(noisy, x, y, jax.random.key(0), eot_iter=1, **kw)
  assert without["robust_accuracy"] >= 0.3


def test_argument_errors_and_public_entry_point():
  logits_fn = Partial(_mlp, *_weights(0))
  x = _images(4, 0)
  y = np.zeros(4, np.int32)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    aa.autoattack(logits_fn, x * 2, y, jax.random.key(0), eps=0.1)
  with pytest.raises(ValueError, match="version"):
    aa.autoattack(logits_fn, x, y, jax.random.key(0), eps=0.1, version="fast")
  with pytest.raises(ValueError, match="norm"):
    aa.autoattack(logits_fn, x, y, jax.random.key(0), eps=0.1, norm="l1")
  autoattack_api = importlib.import_module("agad.evaluation.autoattack_api")
  assert autoattack_api.autoattack is aa.autoattack


def test_few_classes_and_too_many_targets_are_clear_never_an_index_crash():
  dlr_lib = importlib.import_module("agad.attacks.dlr")
  two = jnp.array([[1.0, 0.0]])
  with pytest.raises(ValueError, match="at least 3 classes, the logits have 2"):
    dlr_lib.dlr(two, jnp.array([0]))
  three = jnp.array([[1.0, 0.0, 0.5]])
  with pytest.raises(ValueError, match="at least 4 classes, the logits have 3"):
    dlr_lib.dlr_targeted(three, jnp.array([0]), jnp.array([1]))
  with pytest.raises(ValueError, match=r"num_targets=5 must be in \[1, 2\]"):
    dlr_lib.ranked_targets(three, 5)
  # AutoAttack on a 2-class model: DLR attacks are skipped and the targets capped, with flags.
  w = jnp.asarray(np.random.RandomState(0).randn(DIM, 2).astype(np.float32))
  logits_fn = Partial(lambda w, x: x.reshape(x.shape[0], -1) @ w, w)
  x = _images(8, 3)
  y = np.asarray(jnp.argmax(logits_fn(jnp.asarray(x)), -1))
  res = aa.autoattack(
    logits_fn, x, y, jax.random.key(0), eps=0.05, steps=3, square_queries=10, batch_size=8
  )
  assert list(res["per_attack"]) == ["apgd-ce", "fab-t", "square"]
  flags = " | ".join(res["flags"])
  assert "apgd-t skipped: targeted DLR needs >= 4 classes, the model has 2" in flags
  assert "only 2 classes: targeted attacks use 1 targets, not 9" in flags


def _conv_model(kernel, w, x):
  """A small conv net (conv 3x3 + ReLU, dense): per-row arithmetic through a convolution."""
  h = jax.lax.conv_general_dilated(
    x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  return jax.nn.relu(h).reshape(x.shape[0], -1) @ w


@pytest.mark.slow
def test_same_key_same_result_whatever_the_batch_size_subset_or_device():
  # Per-example keys (fold_in of the example's index): an example's randomness, hence its
  # result on a deterministic model, depends on neither the batch size and bucket nor on
  # which other examples are evaluated, nor on the (CPU) device; bitwise on CPU. APGD runs
  # within one chunk (steps <= chunk: no early exit), so even the stored adversarials,
  # which depend on the random start, must be equal.
  rng = np.random.RandomState(11)
  logits_fn = Partial(
    _conv_model,
    jnp.asarray(rng.randn(3, 3, 3, 8).astype(np.float32) * 0.3),
    jnp.asarray(rng.randn(4 * 4 * 8, CLASSES).astype(np.float32) * 0.3),
  )
  x = _images(24, 12)
  y = np.asarray(jnp.argmax(logits_fn(jnp.asarray(x)), -1))
  kw = dict(eps=0.03, steps=2, square_queries=40, version="custom", attacks=["apgd-ce", "square"])
  run = lambda images, labels, **extra: aa.autoattack(
    logits_fn, images, labels, jax.random.key(5), **kw, **extra
  )
  full = run(x, y, batch_size=24, min_bucket=24)
  assert 0.2 < full["robust_accuracy"] < 0.8  # a case that can tell
  variants = {
    "batch 8": run(x, y, batch_size=8, min_bucket=8),
    "batch 5, buckets 5 and 4": run(x, y, batch_size=5, min_bucket=4),
  }
  with jax.default_device(jax.devices()[-1]):
    variants["last device"] = run(x, y, batch_size=8, min_bucket=8)
  for name, res in variants.items():
    np.testing.assert_array_equal(res["robust"], full["robust"], err_msg=name)
    assert list(res["broken_by"]) == list(full["broken_by"]), name
    np.testing.assert_array_equal(res["adversarial"], full["adversarial"], err_msg=name)
  # A subset: the first 10 examples keep their indices, hence their results.
  part = run(x[:10], y[:10], batch_size=8, min_bucket=8)
  np.testing.assert_array_equal(part["robust"], full["robust"][:10])
  np.testing.assert_array_equal(part["adversarial"], full["adversarial"][:10])
  # Another key changes the random draws (the equalities above are not vacuous).
  other = aa.autoattack(logits_fn, x, y, jax.random.key(6), batch_size=24, min_bucket=24, **kw)
  assert not np.array_equal(other["adversarial"], full["adversarial"])


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.slow
def test_pgd_with_per_example_keys_is_independent_of_the_batch(norm):
  iterative = importlib.import_module("agad.attacks.iterative")
  logits_fn = Partial(_mlp, *_weights(2))
  x = jnp.asarray(_images(12, 13))
  y = jnp.argmax(logits_fn(x), -1)
  keys = runner_lib.example_keys(jax.random.key(3), 12)
  kw = dict(
    eps=0.05 if norm == "linf" else 0.5,
    step_size=0.02 if norm == "linf" else 0.2,
    steps=5,
    norm=norm,
  )
  full = iterative.pgd(logits_fn, x, y, keys, **kw)
  half = iterative.pgd(logits_fn, x[4:10], y[4:10], keys[4:10], **kw)
  np.testing.assert_array_equal(np.asarray(half), np.asarray(full)[4:10])
  # The start alone (no steps) also differs per example and is inside the ball.
  start = iterative.pgd_init(keys, x, eps=kw["eps"], norm=norm).x
  assert not np.array_equal(np.asarray(start[0] - x[0]), np.asarray(start[1] - x[1]))
  np.testing.assert_array_equal(
    np.asarray(iterative.pgd_init(keys[4:10], x[4:10], eps=kw["eps"], norm=norm).x),
    np.asarray(start)[4:10],
  )
  # One key for the whole batch keeps its former (training) behaviour: batch-drawn starts.
  one = iterative.pgd_init(jax.random.key(3), x, eps=kw["eps"], norm=norm).x
  start_key, _ = jax.random.split(jax.random.key(3))
  if norm == "linf":
    expected = jnp.clip(
      x + jax.random.uniform(start_key, x.shape, x.dtype, -1.0, 1.0) * 0.05, 0.0, 1.0
    )
    np.testing.assert_array_equal(np.asarray(one), np.asarray(expected))


def test_verbose_square_reports_progress_within_its_round(capsys, monkeypatch):
  # Square's one round runs thousands of queries: a verbose run logs its progress (at most
  # every aa.PROGRESS_SECONDS, here every block) batch by batch, and a quiet run does not.
  logits_fn = Partial(_mlp, *_weights(3))
  x = _images(12, 14)
  y = np.asarray(jnp.argmax(logits_fn(jnp.asarray(x)), -1))
  monkeypatch.setattr(aa, "PROGRESS_SECONDS", 0.0)
  kw = dict(eps=0.02, version="custom", attacks=["square"], square_queries=40, square_chunk=20)
  kw.update(batch_size=8, min_bucket=4)
  quiet = aa.autoattack(logits_fn, x, y, jax.random.key(2), **kw)
  assert "queries" not in capsys.readouterr().out
  loud = aa.autoattack(logits_fn, x, y, jax.random.key(2), verbose=True, **kw)
  np.testing.assert_array_equal(loud["robust"], quiet["robust"])
  assert 0 < loud["robust_accuracy"]  # some point survives: its batch runs every block
  lines = [line for line in capsys.readouterr().out.splitlines() if "queries" in line]
  for batch in (1, 2):  # each batch reports its first block (before any early exit)
    assert f"[autoattack]   square batch {batch}/2: 20/40 queries, " in "\n".join(lines)
  assert any("/2: 40/40 queries, " in line for line in lines)


class _Interrupted(Exception):
  pass


def _count_verify(monkeypatch, stop_at=None):
  """Counts the batches AutoAttack verifies; raises ``_Interrupted`` at batch ``stop_at``
  (before it is verified: as if the process died during that batch)."""
  calls = []
  verify = aa._verify

  def counting(*args):
    calls.append(1)
    if stop_at is not None and len(calls) == stop_at:
      raise _Interrupted
    return verify(*args)

  monkeypatch.setattr(aa, "_verify", counting)
  return calls


@pytest.mark.slow
def test_an_interrupted_run_goes_on_from_its_progress_file_with_the_same_results(
  tmp_path, monkeypatch
):
  # Each batch saves the per-example results and the position; a run that finds the file
  # skips what was done and ends with exactly the uninterrupted run's results (per-example
  # keys), wherever it was stopped: inside a round, in a later round, in a later stage.
  logits_fn = Partial(_mlp, *_weights(4))
  x = _images(24, 15)
  y = np.asarray(jnp.argmax(logits_fn(jnp.asarray(x)), -1))
  kw = dict(eps=0.03, steps=4, square_queries=30, version="custom", n_target_classes=3)
  kw.update(attacks=["square", "apgd-t", "apgd-ce"], batch_size=8, min_bucket=8)
  run = lambda **extra: aa.autoattack(logits_fn, x, y, jax.random.key(7), **kw, **extra)
  calls = _count_verify(monkeypatch)
  full = run()
  n_full = len(calls)
  assert full["resumed"] is None
  # Square and APGD-T each break points: the results restored from the file matter.
  assert {"square", "apgd-t", ""} <= set(full["broken_by"])
  path = str(tmp_path / "progress.npz")
  # Square's batch 2 of 3; APGD-T's first batch (the file holds Square's end), its round 1
  # batch 2 of 3, its round 2 (the file holds round 1's end); the last APGD-CE batch.
  for stop_at in (2, 4, 5, 7, n_full):
    _count_verify(monkeypatch, stop_at)
    with pytest.raises(_Interrupted):
      run(resume_path=path)
    calls = _count_verify(monkeypatch)
    resumed = run(resume_path=path)
    assert len(calls) == n_full - (stop_at - 1), stop_at  # the done batches are not rerun
    assert resumed["resumed"]["earlier_s"] > 0
    for field in ("robust", "adversarial", "adversarial_predictions", "broken_by"):
      np.testing.assert_array_equal(resumed[field], full[field], err_msg=f"{stop_at} {field}")
    assert resumed["per_attack"] == full["per_attack"]
    assert list(resumed["times"]) == ["square", "apgd-t", "apgd-ce"]
    assert not (tmp_path / "progress.npz").exists()  # removed at the end


def test_a_progress_file_from_another_run_is_refused_with_the_fix(tmp_path, monkeypatch):
  logits_fn = Partial(_mlp, *_weights(4))
  x = _images(16, 16)
  y = np.asarray(jnp.argmax(logits_fn(jnp.asarray(x)), -1))
  kw = dict(steps=2, version="custom", attacks=["apgd-ce"], batch_size=8, min_bucket=8)
  path = str(tmp_path / "progress.npz")
  _count_verify(monkeypatch, stop_at=2)
  with pytest.raises(_Interrupted):
    aa.autoattack(logits_fn, x, y, jax.random.key(0), eps=0.03, resume_path=path, **kw)
  _count_verify(monkeypatch)
  with pytest.raises(ValueError, match="other images, labels, key or settings.*delete the file"):
    aa.autoattack(logits_fn, x, y, jax.random.key(0), eps=0.05, resume_path=path, **kw)
  with pytest.raises(ValueError, match="other images"):
    aa.autoattack(logits_fn, x, y, jax.random.key(1), eps=0.03, resume_path=path, **kw)
  other = Partial(_mlp, *_weights(5))
  with pytest.raises(ValueError, match="another model: [1-9][0-9]* of 16 clean predictions"):
    aa.autoattack(other, x, y, jax.random.key(0), eps=0.03, resume_path=path, **kw)
