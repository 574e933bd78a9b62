"""Smoke runs of the documented launch.train pipelines (AGKD-BML teacher -> student, AFA
stage I, trades+awp with --distributed), tools/afa_branches.py and launch.prepare_data;
registered in tests/docs_commands_test.py."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.smoke import REPO, launch_env, needs_data, run_chain, run_tool, tail


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@needs_data
@pytest.mark.slow
def test_train_pipelines_distributed_and_afa_branches(tmp_path):
  """The documented training commands not run through launch.train elsewhere, 2 steps each of
  the smoke config, in one process: trades+awp with --distributed (a one-process SLURM
  environment, as one host of a pod sees its own), AGKD-BML's teacher (label smoothing over
  the other classes) then its student, AFA stage I; then tools/afa_branches.py on the
  stage-I run. (AFA stage II on a stage-I run: defenses_afa_test, through the Trainer.)"""
  d = {k: str(tmp_path / k) for k in ("trades_awp", "agkd_teacher", "agkd_bml", "afa1")}
  fm = "--config=configs/fashion_mnist.py:"
  steps = "--config.stop_after_steps=2"
  runs = [
    ["--distributed", f"{fm}smallcnn,trades+awp,smoke", steps, f"--workdir={d['trades_awp']}"],
    [
      f"{fm}smallcnn,standard,smoke",
      "--config.objective.standard.label_smoothing=0.5",
      "--config.objective.standard.smoothing=others",
      steps,
      f"--workdir={d['agkd_teacher']}",
    ],
    [
      f"{fm}smallcnn,agkd_bml,smoke",
      f"--config.objective.agkd_bml.teacher.workdir={d['agkd_teacher']}",
      f"--config.init.workdir={d['agkd_teacher']}",
      steps,
      f"--workdir={d['agkd_bml']}",
    ],
    [f"{fm}smallcnn_bn,afa,smoke", steps, f"--workdir={d['afa1']}"],
  ]
  env = launch_env(
    SLURM_JOB_ID="1",
    SLURM_STEP_NODELIST="localhost",
    SLURM_NTASKS="1",
    SLURM_PROCID="0",
    SLURM_LOCALID="0",
    SLURM_STEP_NUM_NODES="1",
    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
  )
  out = run_chain("launch.train", runs, env=env)
  assert out.returncode == 0, tail(out)
  assert out.stdout.count("[chain] ok") == len(runs)
  assert "JAX distributed" in out.stderr and "process 0/1" in out.stderr
  configs = {k: json.load(open(os.path.join(v, "config.json"))) for k, v in d.items()}
  for k, v in d.items():
    metrics = [json.loads(l) for l in open(os.path.join(v, "metrics.jsonl"))]
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert losses and all(np.isfinite(losses)), (k, metrics)
    assert os.path.isdir(os.path.join(v, "checkpoints", "2")), k
  assert configs["agkd_teacher"]["objective"]["standard"] == {
    "label_smoothing": 0.5,
    "smoothing": "others",
  }
  assert configs["agkd_bml"]["objective"]["agkd_bml"]["teacher"]["workdir"] == d["agkd_teacher"]
  assert configs["agkd_bml"]["init"]["workdir"] == d["agkd_teacher"]
  assert (
    configs["afa1"]["objective"]["name"] == "afa"
    and configs["afa1"]["model"]["name"] == "smallcnn_bn"
  )
  assert "frozen inputs of agkd_bml" in out.stderr

  out = run_tool(
    "afa_branches.py",
    [
      f"--workdir={d['afa1']}",
      "--num_examples=4",
      "--steps=1",
      "--eps=0,1",
      f"--output={tmp_path / 'sweep.json'}",
    ],
  )
  assert out.returncode == 0, tail(out)
  sweep = json.load(open(tmp_path / "sweep.json"))
  assert sweep["step"] == 2 and sweep["n"] == 4 and sweep["eps"] == [0.0, 0.1]
  assert sweep["names"][0] == "BN_0" and len(sweep["accuracy"]) == len(sweep["names"])
  assert "| best routing |" in out.stdout


@needs_data
def test_prepare_data_paths_with_mocked_tfds(tmp_path):
  """launch.prepare_data without internet, in one process: Tiny ImageNet prints its manual
  steps; CIFAR-10 without TensorFlow exits with the fix; with TensorFlow reported present and
  TFDS mocked (tfds.testing.mock_data: download_and_prepare is a no-op, data sources are 12
  random examples) it prepares array_record files and prints the split sizes; a failing
  download exits with the way out."""
  script = r"""
import sys
from absl import app, flags
import tensorflow_datasets as tfds
from launch import prepare_data

def run(*args):
  flags.FLAGS.unparse_flags()
  try:
    app.run(prepare_data.main, argv=["launch.prepare_data", *args])
  except SystemExit as e:
    print(f"[exit] {e.code}", flush=True)

data_dir = sys.argv[1]
run("--dataset=tiny_imagenet", f"--data_dir={data_dir}")
real = prepare_data.tensorflow_installed()
print(f"[tensorflow] {real}", flush=True)
if not real:
  run("--dataset=cifar10", f"--data_dir={data_dir}")
prepare_data.tensorflow_installed = lambda: True
with tfds.testing.mock_data(num_examples=12):
  calls = []
  mocked = tfds.core.DatasetBuilder.download_and_prepare
  def spy(self, *a, **kw):
    calls.append((self.name, kw))
    return mocked(self, *a, **kw)
  tfds.core.DatasetBuilder.download_and_prepare = spy
  run("--dataset=cifar10", f"--data_dir={data_dir}")
  print(f"[calls] {calls}", flush=True)
  def offline(self, *a, **kw):
    raise ConnectionError("no route to host")
  tfds.core.DatasetBuilder.download_and_prepare = offline
  run("--dataset=svhn_cropped", f"--data_dir={data_dir}")
"""
  out = subprocess.run(
    [sys.executable, "-c", script, str(tmp_path)],
    cwd=REPO,
    env=launch_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, tail(out)
  text = out.stdout
  assert f"unzip -q tiny-imagenet-200.zip -d {tmp_path}" in text
  if "[tensorflow] False" in text:
    assert "Preparing cifar10 needs TensorFlow" in text and "pip install -e .[prepare]" in text
  assert f"Prepared cifar10 in {tmp_path}: {{'train': 12, 'test': 12}} examples" in text
  assert "[calls] [('cifar10', {'file_format': 'array_record'})]" in text
  assert f"Preparing svhn_cropped in {tmp_path} failed: ConnectionError: no route to host" in text
  assert "HTTPS_PROXY" in text
