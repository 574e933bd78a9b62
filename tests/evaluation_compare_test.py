"""Paired defense-vs-base comparison (``agad.evaluation.compare``, ``launch.compare``)."""

import json
import math
import os
import subprocess
import sys

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from agad.data import ArraySource
from agad.evaluation import AttackSpec, compare, run_suite

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
  "k,m,want",
  [(0, 5, 2 / 32), (5, 5, 2 / 32), (1, 6, 2 * 7 / 64), (2, 4, 1.0), (0, 0, 1.0), (0, 1, 1.0)],
)
def test_sign_test_p_by_hand(k, m, want):
  assert compare.sign_test_p(k, m) == pytest.approx(want)


def test_paired_difference_by_hand():
  a = np.array([1, 1, 0, 0, 1], bool)
  b = np.array([1, 0, 0, 1, 0], bool)
  got = compare.paired(a, b)
  # d = (0, 1, 0, -1, 1): mean 0.2, sample variance 2.8 / 4 = 0.7.
  want = {
    "n": 5,
    "acc_a": 0.6,
    "acc_b": 0.4,
    "diff": 0.2,
    "stderr": math.sqrt(0.7 / 5),
    "a_only": 2,
    "b_only": 1,
    "p_value": 1.0,
  }
  chex.assert_trees_all_close(got, want)
  # Identical runs: no difference, no discordant pair.
  same = compare.paired(a, a)
  assert (same["diff"], same["stderr"], same["a_only"], same["b_only"], same["p_value"]) == (
    0.0,
    0.0,
    0,
    0,
    1.0,
  )
  with pytest.raises(ValueError, match=r"\(5,\) and \(4,\)"):
    compare.paired(a, b[:4])


def test_pooled_weights_seeds_equally():
  got = compare.pooled([{"diff": 0.02, "stderr": 0.01}, {"diff": 0.04, "stderr": 0.02}])
  chex.assert_trees_all_close(
    got,
    {
      "seeds": 2,
      "diff": 0.03,
      "stderr": math.sqrt(0.01**2 + 0.02**2) / 2,
      "min_diff": 0.02,
      "max_diff": 0.04,
    },
  )


def _linear_source(n=40, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, n)
  margin = rng.choice([0.04, 0.06, 0.16, 0.25], (n, 1, 1, 1))  # none near eps = 0.1
  images = 0.5 + (2 * labels[:, None, None, None] - 1) * margin + np.zeros((n, 2, 2, 1))
  return ArraySource((images * 255).round().astype(np.uint8), labels)


def _linear(scale, x):
  s = jnp.mean(x.reshape(x.shape[0], -1), -1) - 0.5
  return jnp.stack([-scale * s, scale * s], -1)


def _write(tmp_path, name, report):
  """What checkpoint_eval.evaluate writes: the JSON without arrays, the arrays in the .npz beside it."""
  stem = os.path.join(tmp_path, name)
  np.savez(stem + ".npz", **report.pop("per_example"))
  with open(stem + ".json", "w") as f:
    json.dump(
      {**report, "dataset": "toy", "split": "test", "objective": name},
      f,
      default=lambda o: np.asarray(o).tolist(),
    )
  return stem + ".json"


def test_suite_per_example_results_and_paired_comparison(tmp_path):
  source = _linear_source()
  specs = [
    AttackSpec.make("clean", "clean", eps=0.1),
    AttackSpec.make("pgd-5", "pgd", eps=0.1, step_size=0.04, steps=5, restarts=1),
  ]
  reports = {
    name: run_suite(Partial(_linear, 1.0), source, specs, eps=0.1, batch_size=16, log=None)
    for name in ("a", "b")
  }
  per = reports["a"]["per_example"]
  chex.assert_shape(
    [per["indices"], per["worst_case"], per["row/clean"], per["row/pgd-5"]], [(40,)] * 4
  )
  np.testing.assert_array_equal(per["worst_case"], per["row/clean"] & per["row/pgd-5"])
  assert per["worst_case"].mean() == reports["a"]["worst_case"]["accuracy"]
  # A linear model, margin |mean(x) - 0.5| against eps 0.1: robust exactly where the margin exceeds eps.
  x = source.images.reshape(40, -1).astype(np.float32) / 255
  np.testing.assert_array_equal(per["worst_case"], np.abs(x.mean(-1) - 0.5) > 0.1 + 1e-6)

  pa, pb = (_write(tmp_path, k, dict(r)) for k, r in reports.items())
  same = compare.compare_reports(pa, pb)
  assert (same["diff"], same["a_only"], same["b_only"], same["p_value"]) == (0.0, 0, 0, 1.0)

  # Another run on other images is refused; so is a tampered .npz.
  other = run_suite(
    Partial(_linear, 1.0), source, specs, eps=0.1, batch_size=16, log=None, indices=np.arange(30)
  )
  pc = _write(tmp_path, "c", dict(other))
  with pytest.raises(ValueError, match="different test images"):
    compare.compare_reports(pa, pc)
  arrays = dict(np.load(pb[:-5] + ".npz"))
  arrays["worst_case"] = ~arrays["worst_case"]
  np.savez(pb[:-5] + ".npz", **arrays)
  with pytest.raises(ValueError, match="does not match its report's worst case"):
    compare.compare_reports(pa, pb)
  os.remove(pb[:-5] + ".npz")
  with pytest.raises(FileNotFoundError, match="re-run `python -m launch.evaluate"):
    compare.compare_reports(pa, pb)


def test_report_path_names_the_fix(tmp_path):
  with pytest.raises(
    FileNotFoundError, match=r"0 reports match eval/report_step\*_table_aa_n1000.json"
  ):
    compare.report_path(str(tmp_path), "table_aa", 1000)


def test_launch_compare_prints_per_seed_and_pooled(tmp_path):
  source = _linear_source()
  specs = [AttackSpec.make("clean", "clean", eps=0.1)]
  paths = {}
  for name, scale in (("def", 1.0), ("base", -1.0)):  # the base predicts the wrong class everywhere
    paths[name] = _write(
      tmp_path,
      name,
      run_suite(Partial(_linear, scale), source, specs, eps=0.1, batch_size=16, log=None),
    )
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.compare",
      f"--defense={paths['def']}",
      f"--base={paths['base']}",
      f"--output={tmp_path}/cmp.json",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.load(open(tmp_path / "cmp.json"))
  n_right = int(compare.load_per_example(paths["def"])[1]["worst_case"].sum())
  assert result["pairs"][0]["a_only"] == n_right and result["pairs"][0]["b_only"] == 0
  assert result["pooled"]["diff"] == pytest.approx(n_right / 40)
  assert "pooled over 1 seed pair(s)" in out.stdout
