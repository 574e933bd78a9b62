"""A real multi-process run over loopback (docs/multihost.md): two processes on 127.0.0.1 with
2 fake CPU devices each (a global mesh of 4) train and evaluate a Fashion-MNIST smoke run of
SmallCNN-BN + AGAIN (a plug-in defense) like one process with 4 devices; one of the two is
SIGKILLed after the first checkpoint, the other stops by itself, and restarting both resumes.

The children compile in the suite's cheap-compile mode (``tests.smoke.launch_env``). That
mode once made the gradient of SmallCNN-BN's first stage depend on the device count (the max
pool's gradient; docs/results/numerics.md), which the comparison would have caught.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

from tests import smoke
from tests.helpers import F32

pytestmark = smoke.needs_data

# 64 training images, batch 32: 2 steps per epoch, 3 epochs; a checkpoint and a validation
# at every epoch end (steps 2, 4, 6). Synchronous saves: a step folder is complete once there.
TRAIN = [
  "--config=configs/fashion_mnist.py:smallcnn_bn,again,smoke",
  "--config.data.max_train=64",
  "--config.num_epochs=3",
  "--config.log_every_steps=1",
  "--config.checkpoint.async_save=False",
  "--config.validation.adaptive=False",
]
EVAL = ["--step=latest", "--preset=pgd", "--num_examples=64"]
HEARTBEAT_S = 5  # --heartbeat_timeout: how long the survivor runs on after its peer dies
TIMEOUT_S = 300  # any one launch (the suite's CPUs are shared)


def _env(devices: int) -> dict:
  flags = os.environ.get("XLA_FLAGS", "")
  return smoke.launch_env(
    XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  )


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Launch:
  """``python -m MODULE ARGS`` in ``processes`` processes (2 devices each, 4 for one process)."""

  def __init__(self, module: str, args: list[str], log: str, processes: int = 2):
    extra = lambda p: (
      [
        f"--coordinator_address=127.0.0.1:{self.port}",
        f"--num_processes={processes}",
        f"--process_id={p}",
        f"--heartbeat_timeout={HEARTBEAT_S}",
      ]
      if processes > 1
      else []
    )
    self.port, self.logs = _free_port(), [f"{log}.p{p}" for p in range(processes)]
    self.procs = [
      subprocess.Popen(
        [sys.executable, "-m", module, *args, *extra(p)],
        cwd=smoke.REPO,
        env=_env(4 // processes),
        stdout=subprocess.DEVNULL,
        stderr=open(self.logs[p], "w"),
      )
      for p in range(processes)
    ]

  def wait(self, timeout: float = TIMEOUT_S) -> list[int]:
    deadline = time.time() + timeout
    try:
      return [p.wait(timeout=max(deadline - time.time(), 1)) for p in self.procs]
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f"{self.logs[0]}: no exit within {timeout} s\n{self.tail()}")

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()

  def tail(self, p: int = 0, n: int = 3000) -> str:
    return open(self.logs[p]).read()[-n:]

  def ok(self) -> None:
    codes = self.wait()
    assert codes == [0] * len(codes), "\n".join(
      f"process {p}: {c}\n{self.tail(p)}" for p, c in enumerate(codes)
    )


def _committed(workdir, step: int) -> bool:
  return os.path.exists(os.path.join(workdir, "checkpoints", str(step), "commit_success.txt"))


def _accuracies(eval_dir) -> dict:
  (report,) = smoke.reports(eval_dir, "pgd")
  out = json.load(open(report))
  return {
    **{r["attack"]: (r["accuracy"], r["n"]) for r in out["records"]},
    "worst-case": (out["worst_case"]["accuracy"], out["worst_case"]["n"]),
  }


def _losses(workdir) -> dict:
  return {
    m["step"]: m["train/loss"]
    for m in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
    if "train/loss" in m
  }


@pytest.mark.slow
def test_two_processes_equal_one_and_survive_a_sigkill(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  launches = []
  try:
    # The reference (one process, 4 devices) runs beside the two-process run.
    t0 = time.time()
    reference = Launch(
      "launch.train", [*TRAIN, f"--workdir={one}"], str(tmp_path / "one_train"), processes=1
    )
    first = Launch("launch.train", [*TRAIN, f"--workdir={two}"], str(tmp_path / "two_train1"))
    launches += [reference, first]
    deadline = time.time() + TIMEOUT_S
    while (
      not _committed(two, 2) and time.time() < deadline and None in [p.poll() for p in first.procs]
    ):
      time.sleep(0.05)
    assert _committed(two, 2), f"no checkpoint at step 2\n{first.tail()}"
    # Preemption: process 1 dies; process 0 is stopped by the coordination service.
    first.procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    codes = first.wait(timeout=HEARTBEAT_S + 60)
    survivor_s = time.time() - killed_at
    assert codes[1] == -signal.SIGKILL
    assert codes[0] != 0 and "another task died" in first.tail(0, 20000), first.tail(0)
    assert not _committed(two, 6), "the run finished before the kill: the test did not preempt it"

    print(f"[multihost] first launch killed at {time.time() - t0:.0f} s")
    second = Launch("launch.train", [*TRAIN, f"--workdir={two}"], str(tmp_path / "two_train2"))
    launches.append(second)
    # Compiling is mostly one thread per process: the reference's evaluation overlaps the restart.
    reference.ok()
    launches.append(
      Launch(
        "launch.evaluate", [f"--workdir={one}", *EVAL], str(tmp_path / "one_eval"), processes=1
      )
    )
    second.ok()
    resumed = [l for l in open(second.logs[0]) if "resumed from step" in l]
    assert resumed and int(resumed[0].split("resumed from step")[1].split()[0]) in (2, 4), (
      second.tail()
    )
    print(f"[multihost] trained at {time.time() - t0:.0f} s")
    launches.append(
      Launch("launch.evaluate", [f"--workdir={two}", *EVAL], str(tmp_path / "two_eval"))
    )
    launches[-2].ok()
    launches[-1].ok()
    print(f"[multihost] evaluated at {time.time() - t0:.0f} s")
  finally:
    for launch in launches:
      launch.kill()

  # The same run: final parameters and BN statistics (agad.load, in this one process), the
  # per-step training losses (the same global batches), the evaluation numbers.
  from agad import api

  a, b = api.load(one, "latest"), api.load(two, "latest")
  assert a.step == b.step == 6
  chex.assert_trees_all_close(b.variables, a.variables, **F32)
  assert set(b.variables) == {"params", "batch_stats"}
  la, lb = _losses(one), _losses(two)
  assert sorted(la) == sorted(lb) == list(range(1, 7))  # each step logged once (process 0)
  np.testing.assert_allclose([lb[s] for s in sorted(lb)], [la[s] for s in sorted(la)], **F32)
  assert _accuracies(os.path.join(two, "eval")) == _accuracies(os.path.join(one, "eval"))

  # Written once, not once per host: orbax splits the replicated state's bytes between the
  # hosts (ocdbt.process_0/1), as many bytes as one process writes; one run record entry per launch.
  size = lambda w: sum(
    os.path.getsize(os.path.join(r, f))
    for r, _, fs in os.walk(os.path.join(w, "checkpoints", "6", "state"))
    for f in fs
  )
  assert 0.9 < size(two) / size(one) < 1.25, (size(two), size(one))
  assert len(json.load(open(os.path.join(two, "run_record.json")))["launches"]) == 2
  print(f"survivor stopped {survivor_s:.1f} s after the SIGKILL")
