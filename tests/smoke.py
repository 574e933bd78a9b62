"""Helpers of the smoke runs of launch commands (subprocesses on real Fashion-MNIST).

The shared smoke checkpoint itself is the session fixture ``smoke_workdir`` in conftest.py.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"
SMOKE_CONFIG = "configs/fashion_mnist.py:smallcnn,pgd_at,smoke"
needs_data = pytest.mark.skipif(
  not os.path.exists(FMNIST),
  reason="Debian package dataset-fashion-mnist not installed (launch/env.sh installs it)",
)


def launch_env(**extra) -> dict:
  """The environment of a launch subprocess: CPU, this checkout first on the path, and the
  suite's compile policy (conftest.py: cheap compiles beat fast code for tiny programs;
  the smoke runs are compile-bound, about 1.5-2.5x faster this way)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  env.update(extra)
  return env


def run_module(args, *, env=None, timeout=600, **kw) -> subprocess.CompletedProcess:
  """``python -m args[0] args[1:]`` in the repository root."""
  return subprocess.run(
    [sys.executable, "-m", *args],
    cwd=REPO,
    env=env or launch_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
    **kw,
  )


def run_tool(script: str, args=(), *, env=None, timeout=600) -> subprocess.CompletedProcess:
  """``python tools/<script> args`` in the repository root (the dev scripts are files, not
  modules of the installed package)."""
  return subprocess.run(
    [sys.executable, os.path.join(REPO, "tools", script), *args],
    cwd=REPO,
    env=env or launch_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def run_chain(
  module: str, runs: list[list[str]], *, env=None, timeout=600
) -> subprocess.CompletedProcess:
  """Several ``python -m module ARGS`` in one process (tests/launch_chain.py)."""
  return subprocess.run(
    [sys.executable, os.path.join(REPO, "tests", "launch_chain.py"), module, json.dumps(runs)],
    cwd=REPO,
    env=env or launch_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def run_bash(script: str, args=(), *, env=None, timeout=600) -> subprocess.CompletedProcess:
  return subprocess.run(
    ["bash", script, *args],
    cwd=REPO,
    env=env or launch_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def copy_workdir(src: str, dst) -> str:
  """A private copy of a (shared) workdir, for commands that write into their workdir."""
  shutil.copytree(src, dst)
  return str(dst)


def env_sh_is_a_no_op() -> bool:
  """launch/env.sh would only check (no venv creation, pip or apt): the scripts that source
  it can run offline."""
  stamp = os.path.join(REPO, ".venv", ".agad-installed")
  if not (
    os.access(os.path.join(REPO, ".venv", "bin", "python"), os.X_OK)
    and os.path.exists(stamp)
    and os.path.exists(FMNIST)
  ):
    return False
  want = hashlib.sha256(
    b"".join(
      open(os.path.join(REPO, f), "rb").read() for f in ("requirements.txt", "pyproject.toml")
    )
  ).hexdigest()
  return open(stamp).read().strip() == want


def require_env_sh_no_op() -> None:
  """Skips, right before a script sources launch/env.sh, if env.sh would install (the
  requirements can change while the suite runs: env.sh would pip-install into .venv)."""
  if not env_sh_is_a_no_op():
    pytest.skip(
      ".venv's install stamp does not match requirements.txt + pyproject.toml: "
      "launch/env.sh would pip-install"
    )


needs_env_sh = pytest.mark.skipif(
  not env_sh_is_a_no_op(),
  reason=".venv is not set up with the pinned requirements (or Fashion-MNIST is missing): "
  "launch/env.sh would install (internet)",
)


def tail(out: subprocess.CompletedProcess, n: int = 3000) -> str:
  return out.stdout[-n // 3 :] + "\n--- stderr ---\n" + out.stderr[-n:]


def reports(folder, preset: str) -> list[str]:
  """The report JSONs of one preset in an eval folder (``report_step<S>_<preset>[_n<N>].json``)."""
  return sorted(
    p
    for p in glob.glob(os.path.join(str(folder), "report_step*.json"))
    if re.fullmatch(rf"report_step\d+_{preset}(_n\d+)?\.json", os.path.basename(p))
  )


def attacks(path: str) -> list[str]:
  """The attacks of a report, in order."""
  return [r["attack"] for r in json.load(open(path))["records"]]


def load_tool(name: str):
  """``tools/<name>.py``: a dev script (no package), loaded from its file."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up by name
  spec.loader.exec_module(module)
  return module
