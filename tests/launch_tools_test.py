"""Smoke runs of launch.benchmark (every mode) and tools/recipe_smoke.py; registered in
tests/docs_commands_test.py."""

import os
import subprocess
import sys
import pytest

from tests.smoke import (
  REPO,
  SMOKE_CONFIG,
  copy_workdir,
  launch_env,
  needs_data,
  run_chain,
  run_tool,
  tail,
)


@needs_data
@pytest.mark.slow
def test_benchmark_every_mode(smoke_workdir):
  """launch.benchmark's three modes in one process: train and eval on the smoke config
  (synthetic inputs, batch 8, one timed step), autoattack on the smoke checkpoint (2 images)."""
  config = f"--config={SMOKE_CONFIG}"
  out = run_chain(
    "launch.benchmark",
    [
      [config, "--batch_size=8", "--steps=1"],
      [config, "--mode=eval", "--batch_size=8", "--steps=1", "--pgd_steps=1"],
      ["--mode=autoattack", f"--workdir={smoke_workdir}", "--num_examples=2"],
    ],
  )
  assert out.returncode == 0, tail(out)
  lines = out.stdout.splitlines()
  train = next(l for l in lines if l.startswith("[train] "))
  assert (
    "smallcnn" in train
    and "pgd_at PGD-2" in train
    and "global batch 8" in train
    and "images/s" in train
  )
  evaluation = next(l for l in lines if l.startswith("[eval] "))
  assert evaluation.startswith("[eval] PGD-1 driver=auto") and "images/s" in evaluation
  aa = next(l for l in lines if l.startswith("[autoattack] "))
  assert "smallcnn pgd_at step" in aa and "2 images, eps 0.1" in aa


@pytest.mark.slow
def test_recipe_smoke_runs_one_recipe(tmp_path):
  """``python tools/recipe_smoke.py --only=cifar10:resnet18,fsr``: one step of one paper
  recipe (ResNet-18, FSR) on synthetic CIFAR-10-shaped data, batch 2; the tool runs the others
  the same way (each takes minutes on this CPU)."""
  out = run_tool(
    "recipe_smoke.py", ["--only=cifar10:resnet18,fsr", "--batch=2", f"--workdir={tmp_path}"]
  )
  assert out.returncode == 0, tail(out)
  assert "cifar10:resnet18,fsr: OK, 1 step" in out.stdout and "all recipes passed" in out.stdout


@needs_data
@pytest.mark.slow
def test_chaos_train_eval_mode_smoke(smoke_workdir, tmp_path):
  """``tools/chaos_train.py`` (docs/results/chaos.md): its eval mode, one SIGKILL inside an
  AutoAttack evaluation of a copy of the shared smoke checkpoint on 4 images, then the rerun
  gives the uninterrupted report. The train mode's property (SIGKILLs, one mid-save, resume
  bitwise) is tests/training_test.py::test_sigkill_during_a_save_and_in_training_resumes_bitwise."""
  model = copy_workdir(smoke_workdir, tmp_path / "model")
  out = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "tools", "chaos_train.py"),
      "eval",
      "--kills=1",
      f"--model={model}",
      "--num_examples=4",
      "--chunk=2",
      f"--root={tmp_path / 'eval'}",
    ],
    cwd=REPO,
    env=launch_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, tail(out)
  assert "verdict: report and per-example results identical" in out.stdout + out.stderr, tail(out)
