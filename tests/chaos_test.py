"""Chaos in evaluation: AutoAttack cut off in the middle of a chunk (a SIGKILL, or a kill
while a cache entry is being written) resumes from the per-chunk cache to the same report.

The SIGKILL version on a real checkpoint (``launch.evaluate --preset=autoattack``) is
``tools/chaos_train.py eval``; training's SIGKILL test is in training_test.py.
"""

import glob
import importlib
import os

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from agad.data import ArraySource
from agad.evaluation import AttackSpec, attack_kinds, run_suite
from agad.evaluation import suite as suite_lib

SHAPE = (6, 6, 1)
N, CHUNK = 48, 16
# Fields of a report that measure the run (time, cache hits), not its result.
RUN_FIELDS = ("wall_time_s", "this_run_s", "cached_chunks", "per_attack_time_s")


class Killed(BaseException):
  """Stands for SIGKILL: nothing in the suite catches it."""


def _templates():
  """48 noisy copies of 3 templates and their nearest-template (linear) classifier."""
  rng = np.random.default_rng(2)
  templates = rng.uniform(0.2, 0.8, (3, *SHAPE)).astype(np.float32)
  labels = rng.integers(0, 3, N)
  images = np.clip(templates[labels] + rng.normal(0, 0.03, (N, *SHAPE)), 0, 1)
  source = ArraySource((images * 255).round().astype(np.uint8), labels)
  t = jnp.asarray(templates.reshape(3, -1))
  return source, Partial(lambda t, x: 2.0 * x.reshape(x.shape[0], -1) @ t.T - jnp.sum(t * t, -1), t)


def _result(report):
  """The report without its run measurements, and its per-example arrays."""
  strip = lambda r: {k: v for k, v in r.items() if k not in RUN_FIELDS}
  rest = {k: v for k, v in report.items() if k not in ("records", "per_example", "wall_time_s")}
  return [strip(r) for r in report["records"]], rest, report["per_example"]


def _assert_same_result(report, reference):
  (records, rest, arrays), (ref_records, ref_rest, ref_arrays) = (
    _result(report),
    _result(reference),
  )
  assert records == ref_records
  assert rest == ref_rest
  chex.assert_trees_all_equal(arrays, ref_arrays)


EPS = 0.16  # leaves ~20% of the examples robust
# AutoAttack's code path (stages, per-chunk cache with the stage that broke each example)
# with its first attack only, 10 steps: cheap to compile. Three chunks of 16 examples.
SPEC = AttackSpec.make(
  "autoattack-custom", "autoattack", eps=EPS, version="custom", attacks=("apgd-ce",), steps=10
)


def test_autoattack_cut_off_mid_chunk_resumes_from_the_cache_to_the_same_report(
  tmp_path, monkeypatch
):
  source, logits_fn = _templates()
  specs = [AttackSpec.make("clean", "clean", eps=EPS), SPEC]
  kw = dict(eps=EPS, batch_size=CHUNK, chunk=CHUNK, model_hash="m", log=None)
  reference = run_suite(logits_fn, source, specs, cache_dir=str(tmp_path / "reference"), **kw)
  assert 0.0 < reference["records"][1]["accuracy"] < reference["records"][0]["accuracy"]

  # Cut off inside the second AutoAttack chunk: its attacks ran, its cache entry was never
  # written (a SIGKILL), and a kill during the write left a truncated temporary file.
  cache = str(tmp_path / "killed")
  real, calls = attack_kinds.run_autoattack, []

  def killed_in_chunk_2(*args, **kwargs):
    calls.append(1)
    out = real(*args, **kwargs)
    if len(calls) == 2:
      raise Killed()
    return out

  monkeypatch.setattr(attack_kinds, "run_autoattack", killed_in_chunk_2)
  with pytest.raises(Killed):
    run_suite(logits_fn, source, specs, cache_dir=cache, **kw)
  monkeypatch.undo()
  assert len(glob.glob(os.path.join(cache, "*.npz"))) == 3 + 1  # clean's 3 chunks, AA's first
  key = suite_lib.cache_key("m", SPEC, np.arange(CHUNK, 2 * CHUNK), 0)
  with open(os.path.join(cache, key + ".npz.tmp.npz"), "wb") as f:
    f.write(b"PK\x03\x04 cut off")

  resumed = run_suite(logits_fn, source, specs, cache_dir=cache, **kw)
  assert [r["cached_chunks"] for r in resumed["records"]] == [3, 1]  # only the lost work redone
  _assert_same_result(resumed, reference)
  assert not glob.glob(os.path.join(cache, "*.tmp.npz"))  # the rerun's write replaced it


def test_autoattack_cut_off_mid_batch_goes_on_from_its_progress_file(tmp_path, monkeypatch):
  # One chunk of 16 in batches of 8, killed while AutoAttack verifies the chunk's second
  # batch: the rerun finds the progress file beside the chunk's cache entry, attacks only
  # that batch, and writes the report of an uninterrupted run.
  aa_lib = importlib.import_module("agad.attacks.autoattack")
  source, logits_fn = _templates()
  specs = [AttackSpec.make("clean", "clean", eps=EPS), SPEC]
  kw = dict(eps=EPS, batch_size=8, chunk=CHUNK, model_hash="m", log=None, indices=np.arange(CHUNK))
  reference = run_suite(logits_fn, source, specs, cache_dir=str(tmp_path / "reference"), **kw)
  cache = str(tmp_path / "killed")
  real, calls, kill_at = aa_lib._verify, [], [2]

  def verify(*args):
    calls.append(1)
    if len(calls) in kill_at:
      raise Killed()
    return real(*args)

  monkeypatch.setattr(aa_lib, "_verify", verify)
  with pytest.raises(Killed):
    run_suite(logits_fn, source, specs, cache_dir=cache, **kw)
  key = suite_lib.cache_key("m", SPEC, np.arange(CHUNK), 0)
  assert os.path.exists(os.path.join(cache, key + ".autoattack_progress.npz"))
  calls.clear()
  kill_at.clear()
  resumed = run_suite(logits_fn, source, specs, cache_dir=cache, **kw)
  assert len(calls) == 1  # only the second batch was attacked again
  _assert_same_result(resumed, reference)
  assert glob.glob(os.path.join(cache, "*progress*")) == []  # removed once the chunk is cached
