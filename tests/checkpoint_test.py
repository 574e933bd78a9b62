"""Checkpoints: damaged newest checkpoints are skipped (never deleted); any topology restores.

One tiny run saves steps 2 and 4 (module fixture); each test damages a copy of it.
"""

import glob
import logging
import os
import shutil
import subprocess
import sys

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
  assert ckpt_lib.Checkpointer(os.path.join(saved, "checkpoints"), create=False).all_steps() == [2, 4]
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


DAMAGE = {"truncated": _truncate, "missing_file": _remove_file,
          "missing_commit_marker": _remove_commit_marker}


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
  assert lines[0].startswith("checkpoint step 4 is damaged (") and "resuming from step 2" in lines[0]
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
  with pytest.raises(ValueError, match=r"no intact checkpoint .*step 2: state unreadable: OUT_OF_RANGE.*"
                                       r"step 4: commit_success.txt missing"):
    ckpt_lib.resolve_step(os.path.join(workdir, "checkpoints"), "latest")
  with pytest.raises(ValueError, match=r"no intact checkpoint .*4 \(commit_success.txt missing.*2 \(state unreadable: OUT_OF_RANGE"):
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
  out = subprocess.run([sys.executable, "-c", _ONE_DEVICE_LOGITS, saved, str(tmp_path / "x.npy"),
                        str(tmp_path / "logits.npy")], cwd=REPO, env=env, capture_output=True,
                       text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == "4"
  np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), here)
