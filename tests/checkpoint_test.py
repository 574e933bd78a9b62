"""Checkpoints: damaged newest checkpoints are skipped (never deleted); any topology restores;
a checkpoint folder that cannot be written is one clear error and the last step stays.

One tiny run saves steps 2 and 4 (module fixture); each test damages a copy of it.
"""

import builtins
import errno
import glob
import logging
import os
import shutil
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from agad import checkpoint as ckpt_lib
from agad.training import loop
from tests.helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESUME_TO = 6


def _config(stop_after_steps):
  config = tiny_config(stop_after_steps=stop_after_steps)
  config.checkpoint.every_steps = 2
  return config


def _params(state):
  return jax.device_get(state.params)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """``(saved workdir with steps [2, 4], params of an uninterrupted run to step 6)``."""
  root = tmp_path_factory.mktemp("ckpt")
  saved = str(root / "saved")
  loop.Trainer(_config(4), saved).run()
  assert ckpt_lib.Checkpointer(os.path.join(saved, "checkpoints"), create=False).all_steps() == [
    2,
    4,
  ]
  reference = _params(loop.Trainer(_config(RESUME_TO), str(root / "reference")).run())
  return saved, reference


def _largest_state_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "d", "*")) if os.path.isfile(f)]
  assert files, f"no array data file under {step_dir}/state/d: orbax's layout changed"
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  path = _largest_state_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _remove_file(step_dir):
  os.remove(_largest_state_file(step_dir))


def _remove_commit_marker(step_dir):
  os.remove(os.path.join(step_dir, ckpt_lib.COMMIT_MARKER))


DAMAGE = {
  "truncated": _truncate,
  "missing_file": _remove_file,
  "missing_commit_marker": _remove_commit_marker,
}


def _damaged_copy(saved, tmp_path, how, step=4):
  workdir = str(tmp_path / how)
  shutil.copytree(saved, workdir)
  DAMAGE[how](os.path.join(workdir, "checkpoints", str(step)))
  return workdir


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_evaluation_skips_a_damaged_latest_and_names_it(runs, tmp_path, how, caplog):
  saved, _ = runs
  workdir = _damaged_copy(saved, tmp_path, how)
  directory = os.path.join(workdir, "checkpoints")
  with caplog.at_level(logging.WARNING):
    assert ckpt_lib.resolve_step(directory, "latest") == 2
  assert "checkpoint step 4 is damaged (" in caplog.text
  assert "using step 2" in caplog.text and "intact steps: [2]" in caplog.text
  # The evaluation path (agad.load -> read_state) reads step 2 and equals it bitwise.
  raw, step = ckpt_lib.read_state(workdir, "latest")
  good, _ = ckpt_lib.read_state(saved, 2)
  assert step == 2
  for a, b in zip(jax.tree.leaves(raw), jax.tree.leaves(good), strict=True):
    np.testing.assert_array_equal(a, b)
  # An explicit damaged step is an error naming it and the intact ones.
  with pytest.raises(ValueError, match=r"checkpoint step 4 .* is damaged .*intact: \[2\]"):
    ckpt_lib.resolve_step(directory, 4)
  assert os.path.isdir(os.path.join(directory, "4"))  # evaluation never moves anything


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_resume_continues_from_the_newest_intact_checkpoint(runs, tmp_path, how, caplog):
  saved, reference = runs
  workdir = _damaged_copy(saved, tmp_path, how)
  with caplog.at_level(logging.INFO):
    trainer = loop.Trainer(_config(RESUME_TO), workdir)
    resumed = _params(trainer.run())
  lines = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(lines) == 1, lines
  assert (
    lines[0].startswith("checkpoint step 4 is damaged (") and "resuming from step 2" in lines[0]
  )
  assert "resumed from step 2" in caplog.text
  assert trainer.train_traces == 1
  # Same trajectory as a run never interrupted (bitwise on CPU).
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference), strict=True):
    np.testing.assert_array_equal(a, b)
  # The damaged step is kept, not deleted; training saved step 4 afresh.
  kept = os.path.join(workdir, "checkpoints.damaged", "4")
  assert os.path.isdir(os.path.join(kept, "state"))
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), create=False)
  assert ckpt.all_steps()[-1] == RESUME_TO
  assert all(ckpt_lib.damage(ckpt.directory, s) is None for s in ckpt.all_steps())
  ckpt.close()


def test_every_checkpoint_damaged_is_a_clear_error(runs, tmp_path):
  saved, _ = runs
  workdir = _damaged_copy(saved, tmp_path, "missing_commit_marker")
  _truncate(os.path.join(workdir, "checkpoints", "2"))
  with pytest.raises(
    ValueError,
    match=r"no intact checkpoint .*step 2: state unreadable: OUT_OF_RANGE.*"
    r"step 4: commit_success.txt missing",
  ):
    ckpt_lib.resolve_step(os.path.join(workdir, "checkpoints"), "latest")
  with pytest.raises(
    ValueError,
    match=r"no intact checkpoint .*4 \(commit_success.txt missing.*2 \(state unreadable: OUT_OF_RANGE",
  ):
    loop.Trainer(_config(RESUME_TO), workdir).run()
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]  # nothing moved


_ONE_DEVICE_LOGITS = """
import sys
import jax
import numpy as np
import agad
assert jax.device_count() == 1, jax.devices()
loaded = agad.load(sys.argv[1], "latest")
x = np.load(sys.argv[2])
np.save(sys.argv[3], np.asarray(loaded.logits_fn(x)))
print(loaded.step)
"""


def test_checkpoint_saved_on_4_devices_restores_on_1_with_identical_logits(runs, tmp_path):
  import agad

  saved, _ = runs
  assert jax.device_count() == 4
  loaded = agad.load(saved, "latest")
  x = np.random.default_rng(0).uniform(size=(8, 8, 8, 1)).astype(np.float32)
  here = np.asarray(loaded.logits_fn(x))
  np.save(tmp_path / "x.npy", x)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  out = subprocess.run(
    [
      sys.executable,
      "-c",
      _ONE_DEVICE_LOGITS,
      saved,
      str(tmp_path / "x.npy"),
      str(tmp_path / "logits.npy"),
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == "4"
  np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), here)


def _make_unwritable(monkeypatch, directory, how):
  """New writes under ``directory`` fail as on a read-only (``how="read_only"``) or full disk.

  Read-only: a real ``chmod`` where that stops this process; root ignores permission bits,
  so there Python's mkdir and open-for-writing under ``directory`` raise EROFS, as the
  kernel would. Full: open-for-writing raises ENOSPC (a test cannot fill a disk), so the
  step's folder is made and its first file fails. Tensorstore's array writes (C++) are not
  intercepted: orbax's JSON files fail first, which fails the step all the same.
  Returns the function that makes ``directory`` writable again.
  """
  if how == "read_only" and os.geteuid() != 0:
    os.chmod(directory, 0o555)
    return lambda: os.chmod(directory, 0o755)
  code = errno.EROFS if how == "read_only" else errno.ENOSPC
  inside = lambda path: os.path.abspath(os.fspath(path)).startswith(os.path.join(directory, ""))
  real_mkdir, real_open = os.mkdir, builtins.open

  def mkdir(path, *args, **kwargs):
    if inside(path):
      raise OSError(code, os.strerror(code), os.fspath(path))
    return real_mkdir(path, *args, **kwargs)

  def open_(path, mode="r", *args, **kwargs):
    if isinstance(path, (str, os.PathLike)) and inside(path) and set(mode) & set("wax+"):
      raise OSError(code, os.strerror(code), os.fspath(path))
    return real_open(path, mode, *args, **kwargs)

  if how == "read_only":
    monkeypatch.setattr(os, "mkdir", mkdir)
  monkeypatch.setattr(builtins, "open", open_)
  return monkeypatch.undo


@pytest.mark.parametrize("how,async_save", [("read_only", False), ("disk_full", True)])
def test_unwritable_checkpoints_are_one_clear_error_and_the_last_step_restores(
  runs, tmp_path, monkeypatch, caplog, how, async_save
):
  """Resuming from step 4, the save of step 5 (an epoch end) cannot be written: training stops
  with one line naming the step, the folder and the last good step (an async save's failure
  surfaces at the next save, step 6), orbax logs no traceback, step 4 restores bitwise and, once
  the folder is writable again, a re-run resumes from it to the uninterrupted run's parameters
  (checked for the async case)."""
  saved, reference = runs
  workdir = str(tmp_path / how)
  shutil.copytree(saved, workdir)
  directory = os.path.join(workdir, "checkpoints")
  config = _config(RESUME_TO)
  config.checkpoint.async_save = async_save
  writable_again = _make_unwritable(monkeypatch, directory, how)
  try:
    with caplog.at_level(logging.INFO), pytest.raises(ckpt_lib.WorkdirWriteError) as error:
      loop.Trainer(config, workdir).run()
  finally:
    writable_again()
  message = str(error.value)
  assert "\n" not in message and error.value.path == directory
  assert message.startswith(f"cannot write checkpoint step 5 to {directory} ("), message
  reason = {
    "read_only": ("read-only file system", "permission denied"),
    "disk_full": ("disk full",),
  }[how]
  assert any(f"({r}: {directory}/5.orbax-checkpoint-tmp" in message for r in reason), message
  assert message.endswith(
    "the last good checkpoint, step 4, is kept and restorable: free space or "
    "make it writable, then re-run the same command to resume from it"
  )
  assert not [r.getMessage() for r in caplog.records if r.exc_info], "a traceback was logged"
  assert sorted(d for d in os.listdir(directory) if d.isdigit()) == ["2", "4"]
  raw, step = ckpt_lib.read_state(workdir, "latest")
  assert step == 4
  chex.assert_trees_all_equal(raw, ckpt_lib.read_state(saved, 4)[0])
  if not async_save:
    return  # one resume (the async case's) shows the re-run
  resumed = _params(loop.Trainer(_config(RESUME_TO), workdir).run())
  chex.assert_trees_all_equal(resumed, reference)
  assert not [d for d in os.listdir(directory) if not d.isdigit()]  # the failed write is gone
