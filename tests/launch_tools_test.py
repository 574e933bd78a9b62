"""Smoke runs of launch.benchmark (every mode) and launch.dev.recipe_smoke; registered in
tests/docs_commands_test.py."""

from tests.smoke import SMOKE_CONFIG, needs_data, run_chain, run_module, tail


@needs_data
def test_benchmark_every_mode(smoke_workdir):
  """launch.benchmark's three modes in one process: train and eval on the smoke config
  (synthetic inputs, batch 8, one timed step), autoattack on the smoke checkpoint (2 images)."""
  config = f"--config={SMOKE_CONFIG}"
  out = run_chain("launch.benchmark", [
      [config, "--batch_size=8", "--steps=1"],
      [config, "--mode=eval", "--batch_size=8", "--steps=1", "--pgd_steps=1"],
      ["--mode=autoattack", f"--workdir={smoke_workdir}", "--num_examples=2"]])
  assert out.returncode == 0, tail(out)
  lines = out.stdout.splitlines()
  train = next(l for l in lines if l.startswith("[train] "))
  assert "smallcnn" in train and "pgd_at PGD-2" in train and "global batch 8" in train and "images/s" in train
  evaluation = next(l for l in lines if l.startswith("[eval] "))
  assert evaluation.startswith("[eval] PGD-1 driver=auto") and "images/s" in evaluation
  aa = next(l for l in lines if l.startswith("[autoattack] "))
  assert "smallcnn pgd_at step" in aa and "2 images, eps 0.1" in aa


def test_recipe_smoke_runs_one_recipe(tmp_path):
  """``python -m launch.dev.recipe_smoke --only=cifar10:resnet18,fsr``: one step of one paper
  recipe (ResNet-18, FSR) on synthetic CIFAR-10-shaped data, batch 2; the tool runs the others
  the same way (each takes minutes on this CPU)."""
  out = run_module(["launch.dev.recipe_smoke", "--only=cifar10:resnet18,fsr", "--batch=2",
                    f"--workdir={tmp_path}"])
  assert out.returncode == 0, tail(out)
  assert "cifar10:resnet18,fsr: OK, 1 step" in out.stdout and "all recipes passed" in out.stdout
