"""End to end: launch.train then launch.evaluate on real Fashion-MNIST (smoke config).

launch.train's run is the session's shared smoke checkpoint (``smoke_workdir``, conftest.py);
the commands that write into a workdir run on a private copy of it.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np

import agad
import pytest
from agad.evaluation import AttackSpec, Suite
from tests.smoke import REPO, SMOKE_CONFIG, copy_workdir, launch_env, needs_data


def _run(args, **kw):
  return subprocess.run(
    [sys.executable, "-m", *args], cwd=REPO, env=launch_env(), capture_output=True, text=True, **kw
  )


@needs_data
@pytest.mark.slow
def test_train_then_evaluate_smoke(smoke_workdir, tmp_path):
  # launch.train --config=configs/fashion_mnist.py:smallcnn,pgd_at,smoke (the fixture's run).
  assert "validation at step" in open(smoke_workdir + ".log").read()
  workdir = copy_workdir(smoke_workdir, tmp_path / "run")
  for name in ("config.json", "run_record.json", "metrics.jsonl"):
    assert os.path.exists(os.path.join(workdir, name)), name
  record = json.load(open(os.path.join(workdir, "run_record.json")))["launches"][0]
  assert record["packages"]["jax"] == jax.__version__ and record["devices"]
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert any("val/robust_accuracy" in l for l in lines)

  out = _run(["launch.evaluate", f"--workdir={workdir}", "--step=best"])
  assert out.returncode == 0, out.stderr[-3000:]
  step = agad.load(workdir, "best").step
  report = json.load(open(os.path.join(workdir, "eval", f"report_step{step}_pgd.json")))
  assert os.path.exists(os.path.join(workdir, "eval", f"report_step{step}_pgd.md"))
  clean, pgd = report["records"]
  assert report["computed_here"].startswith("cpu: ") and report["computed_here"].endswith(
    ", default matmul precision"
  )
  assert all(r["computed_on"] == [report["computed_here"]] for r in report["records"])
  assert clean["n"] == pgd["n"] == 128  # smoke: the first 128 test images.
  assert 0.0 <= pgd["accuracy"] <= clean["accuracy"] <= 1.0
  p = clean["accuracy"]
  assert abs(clean["stderr"] - np.sqrt(p * (1 - p) / 128)) < 1e-9

  # The report matches an in-process evaluation of the loaded checkpoint.
  loaded = agad.load(workdir, "best")
  suite = Suite(loaded.logits_fn, loaded.splits().test, batch_size=64, log=None)
  record = suite.run(AttackSpec.make("clean", "clean", eps=0.1))
  assert record["accuracy"] == clean["accuracy"]
  # The cached PGD rows are reused by a second evaluation (no recomputation).
  out = _run(
    ["launch.evaluate", f"--workdir={workdir}", "--step=best", "--matmul_precision=highest"]
  )
  assert out.returncode == 0, out.stderr[-3000:]
  again = json.load(open(os.path.join(workdir, "eval", f"report_step{step}_pgd.json")))
  assert all(r["cached_chunks"] == 1 for r in again["records"])
  assert again["computed_here"].endswith(", highest matmul precision")
  # The rows came from the cache written at default precision, and the report says so.
  assert all(r["computed_on"] == [report["computed_here"]] for r in again["records"])
  md = open(os.path.join(workdir, "eval", f"report_step{step}_pgd.md")).read()
  assert "computed elsewhere" in md and report["computed_here"] in md
  assert [r["accuracy"] for r in again["records"]] == [r["accuracy"] for r in report["records"]]

  # Re-running the finished workdir exits 0 without training.
  again = _run(["launch.train", f"--config={SMOKE_CONFIG}", f"--workdir={workdir}"], timeout=120)
  assert again.returncode == 0 and "already finished" in again.stderr


@pytest.mark.slow
def test_unknown_override_and_bad_arg_fail():
  out = _run(
    [
      "launch.train",
      "--config=configs/fashion_mnist.py:smallcnn,pgd_at,smoke",
      "--workdir=/tmp/never",
      "--config.optim.learning_rate=0.1",
    ]
  )
  assert out.returncode != 0 and "learning_rate" in out.stderr
  # One line naming the field and the fields that exist there, no traceback.
  assert (
    "unknown config field in --config.optim.learning_rate; fields of config.optim: boundaries, "
    "decay_factor, grad_clip, lr," in out.stderr
  ) and "Traceback" not in out.stderr
  out = _run(
    [
      "launch.train",
      "--config=configs/fashion_mnist.py:smallcnn,pgd_at,smoke",
      "--workdir=/tmp/never",
      "--config.attack.eps=3.0",
    ]
  )
  assert out.returncode != 0 and "config.attack.eps=3.0 is invalid" in out.stderr
  assert "Traceback" not in out.stderr and not os.path.exists("/tmp/never")
  out = _run(
    ["launch.train", "--config=configs/fashion_mnist.py:resnet99,pgd_at", "--workdir=/tmp/never"]
  )
  assert out.returncode != 0 and "unknown model 'resnet99'" in out.stderr
