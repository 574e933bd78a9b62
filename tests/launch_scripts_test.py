"""Smoke runs of the documented scripts: launch/main_job.sh and launch/objectives_table.sh
(SMOKE=1, on copies of the shared smoke checkpoint), launch/test.sh and
tools/numerics_sweep.py; registered in tests/docs_commands_test.py."""

import json
import os
import re
import subprocess
import sys
import pytest

from tests.docs_commands_test import documented_commands
from tests.smoke import (
  REPO,
  attacks,
  copy_workdir,
  launch_env,
  needs_data,
  needs_env_sh,
  reports,
  require_env_sh_no_op,
  run_bash,
  tail,
)


@needs_data
@needs_env_sh
@pytest.mark.slow
def test_main_job_sh_smoke(smoke_workdir, tmp_path):
  """``SMOKE=1 bash launch/main_job.sh DIR`` on a copy of the shared checkpoint (same config:
  launch.train finds the run finished and exits), then its evaluation (clean + PGD-3, 128
  test images)."""
  require_env_sh_no_op()
  workdir = copy_workdir(smoke_workdir, tmp_path / "run")
  out = run_bash("launch/main_job.sh", [workdir], env=launch_env(SMOKE="1"))
  assert out.returncode == 0, tail(out)
  assert "already finished" in out.stderr
  (path,) = reports(os.path.join(workdir, "eval"), "pgd")
  report = json.load(open(path))
  assert attacks(path) == ["clean", "pgd-3"] and report["n"] == 128
  assert '{"clean": ' in out.stdout


@needs_data
@needs_env_sh
@pytest.mark.slow
def test_objectives_table_sh_smoke(smoke_workdir, tmp_path):
  """``SMOKE=1 OBJECTIVES=pgd_at NUM_EXAMPLES=2 bash launch/objectives_table.sh RUNS``: the
  row's workdir is a copy of the shared smoke checkpoint (same config: training exits at
  once), then the table preset and the wall-time line."""
  require_env_sh_no_op()
  runs = tmp_path / "runs"
  copy_workdir(smoke_workdir, runs / "pgd_at")
  out = run_bash(
    "launch/objectives_table.sh",
    [str(runs)],
    env=launch_env(SMOKE="1", OBJECTIVES="pgd_at", NUM_EXAMPLES="2"),
  )
  assert out.returncode == 0, tail(out)
  assert "already finished" in out.stderr
  (path,) = reports(str(runs / "pgd_at" / "eval"), "table")
  assert attacks(path) == ["clean", "pgd-3", "cw-30"] and json.load(open(path))["n"] == 2
  assert re.fullmatch(r"pgd_at wall \d+ s\n", (runs / "walltimes.txt").read_text())


@needs_env_sh
@pytest.mark.slow
def test_test_sh_runs_a_test():
  """``bash launch/test.sh PATH`` (env.sh, then pytest with the script's options, xdist
  workers included) on one quick test of this file: the whole suite from inside the suite
  would recurse, and this suite is the rest of the command. The test files that documented
  ``bash launch/test.sh`` / ``python -m pytest`` commands name exist (this suite runs them)."""
  require_env_sh_no_op()
  # A fresh pytest run: none of this run's pytest/xdist variables (the JAX compile cache is kept).
  env = {k: v for k, v in launch_env().items() if not k.startswith("PYTEST_")}
  out = run_bash(
    "launch/test.sh",
    [
      "tests/docs_commands_test.py::test_extraction_reads_every_form_of_command",
      "-p",
      "no:cacheprovider",
    ],
    env=env,
  )
  assert out.returncode == 0, tail(out)
  assert re.search(r"\b1 passed\b", out.stdout), tail(out)
  named = {
    a.split("::")[0]
    for c in documented_commands()
    if c.program in ("pytest", "bash launch/test.sh")
    for a in c.args
    if a.startswith("tests/") and a.split("::")[0].endswith(".py")
  }
  assert all(os.path.exists(os.path.join(REPO, f)) for f in named), named
  # The two tiers: without a path the quick suite (not marked slow), --slow the rest; together
  # the whole suite, each test in one of them.
  tiers = {}
  for flag in ([], ["--slow"]):
    out = run_bash("launch/test.sh", flag + ["--collect-only", "-p", "no:cacheprovider"], env=env)
    assert out.returncode == 0, tail(out)
    tiers[bool(flag)] = {line for line in out.stdout.splitlines() if "::" in line}
    total = int(re.search(r"/(\d+) tests collected", out.stdout).group(1))
  quick, slow = tiers[False], tiers[True]
  assert "tests/launch_scripts_test.py::test_test_sh_runs_a_test" in slow - quick
  assert "tests/docs_commands_test.py::test_extraction_reads_every_form_of_command" in quick - slow
  assert not quick & slow and len(quick | slow) == total, (len(quick), len(slow), total)


@needs_data
@pytest.mark.slow
def test_numerics_sweep_trains_again_under_both_code_paths(tmp_path):
  """docs/results/numerics.md: ``.venv/bin/python tools/numerics_sweep.py`` with one spec,
  AGAIN, i.e. its documented ``launch.train --config=configs/fashion_mnist.py:smallcnn,again,smoke``
  stopped after 3 steps (every step logged), under XLA:CPU's default code path and with YNN
  fusions off: finite loss and gradient norm at every step. In the suite's cheap-compile mode
  (JAX_DISABLE_MOST_OPTIMIZATIONS=1), the compilation in which AGAIN's first gradient norm was
  NaN before its label rows were picked by one-hot products (CHANGELOG)."""
  out = subprocess.run(
    [sys.executable, "tools/numerics_sweep.py", "--specs=again", "--steps=3", f"--out={tmp_path}"],
    cwd=REPO,
    env=launch_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, tail(out)
  lines = out.stdout.splitlines()
  assert [l.split()[:5] for l in lines[:2]] == [
    ["default", "again", "ok", "steps", "3"],
    ["ynn_off", "again", "ok", "steps", "3"],
  ], lines
  assert lines[-1].startswith("all finite")
