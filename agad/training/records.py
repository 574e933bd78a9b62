"""Metrics (JSONL + TensorBoard via tensorboardX) and the run record of a workdir."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import time
from typing import Any

import jax
import numpy as np

from agad import defenses

PACKAGES = (
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "orbax-checkpoint",
  "chex",
  "ml-collections",
  "absl-py",
  "tensorflow-datasets",
  "grain",
  "numpy",
)


class MetricsWriter:
  """Appends ``{"step": s, **scalars}`` lines to ``metrics.jsonl`` and TensorBoard events."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled and jax.process_index() == 0
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
      try:
        from tensorboardX import SummaryWriter  # optional: no TensorBoard files without it

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # TensorBoard files are optional.
        self._tb = None

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


def git_revision() -> str:
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    rev = subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
    ).stdout.strip()
    dirty = subprocess.run(
      ["git", "status", "--porcelain", "--untracked-files=no"],
      cwd=here,
      capture_output=True,
      text=True,
      timeout=5,
    ).stdout.strip()
    return rev + ("+dirty" if dirty else "") if rev else "unknown"
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def package_versions() -> dict[str, str]:
  out = {}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "not installed"
  return out


def run_record(config: Any) -> dict:
  """What a launch ran with; ``defenses`` names each objective/defense module's file and
  SHA-256 (``agad.load`` finds an out-of-tree one from there)."""
  return {
    "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    "git_revision": git_revision(),
    "python": platform.python_version(),
    "packages": package_versions(),
    "devices": [str(d) for d in jax.devices()],
    "process_count": jax.process_count(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "defenses": defenses.sources(config.objective.name),
    "config": json.loads(config.to_json_best_effort())
    if hasattr(config, "to_json_best_effort")
    else dict(config),
  }


def write_json(path: str, obj: Any) -> None:
  """Atomic JSON write (a crash never leaves a half-written file)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=lambda o: np.asarray(o).tolist())
  os.replace(tmp, path)
