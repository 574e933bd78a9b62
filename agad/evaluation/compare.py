"""Paired comparison of two evaluated runs on the same test images.

A defense "beats its base" only if the difference of their worst-case accuracies is larger
than its noise. Both reports cover the same first N test images, so the difference is a
paired one: per image i, ``d_i = a_i - b_i`` with a_i, b_i in {0, 1} (robust under every
attack of the report or not). Reported per pair of runs:

  diff    = mean(d)                          (= acc_a - acc_b)
  stderr  = std(d, ddof=1) / sqrt(n)         (paired: far below the unpaired
                                              sqrt(se_a^2 + se_b^2) when the runs agree on
                                              most images)
  a_only, b_only = images robust for one run only (the discordant pairs)
  p_value = exact two-sided sign test (McNemar) on the discordant pairs: under "no
            difference" each is a_only with probability 1/2.

Several seeds: :func:`pooled` averages the per-seed differences (each seed pair weighted
equally) with ``stderr = sqrt(sum stderr_s^2) / S``; the seed-to-seed spread is printed
beside it, since S = 2 says little about run-to-run variance.

The per-example vectors come from ``<report stem>.npz``, written by
:func:`agad.evaluation.runner.evaluate` beside every JSON report (key ``worst_case``; one
key per row under ``row/<name>``).
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Sequence

import numpy as np


def sign_test_p(k: int, m: int) -> float:
  """Exact two-sided binomial p-value of k successes in m trials at p = 1/2 (1.0 if m = 0)."""
  if m == 0:
    return 1.0
  tail = min(k, m - k)
  p = sum(math.comb(m, j) for j in range(tail + 1)) / 2.0 ** m
  return min(1.0, 2.0 * p)


def paired(a: np.ndarray, b: np.ndarray) -> dict:
  """Paired difference of two per-example correctness vectors (bool or {0, 1}) of equal length."""
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  if a.shape != b.shape or a.ndim != 1 or not a.size:
    raise ValueError(f"paired comparison needs two non-empty vectors of one length, got {a.shape} and {b.shape}")
  d = a.astype(np.float64) - b.astype(np.float64)
  n = d.size
  a_only, b_only = int(np.sum(a & ~b)), int(np.sum(b & ~a))
  return {"n": n, "acc_a": float(a.mean()), "acc_b": float(b.mean()), "diff": float(d.mean()),
          "stderr": float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
          "a_only": a_only, "b_only": b_only, "p_value": sign_test_p(a_only, a_only + b_only)}


def pooled(pairs: Sequence[dict]) -> dict:
  """Equal-weight mean of per-seed paired differences, its standard error and the spread."""
  if not pairs:
    raise ValueError("pooled() needs at least one paired comparison")
  diffs = np.array([p["diff"] for p in pairs])
  se = math.sqrt(sum(p["stderr"] ** 2 for p in pairs)) / len(pairs)
  return {"seeds": len(pairs), "diff": float(diffs.mean()), "stderr": se,
          "min_diff": float(diffs.min()), "max_diff": float(diffs.max())}


def report_path(where: str, preset: str, num_examples: int | None) -> str:
  """A report's JSON: ``where`` itself, or the one ``WORKDIR/eval/report_step*_{preset}[_nN].json``."""
  if where.endswith(".json"):
    return where
  suffix = f"_{preset}" + (f"_n{num_examples}" if num_examples else "")
  found = sorted(glob.glob(os.path.join(where, "eval", f"report_step*{suffix}.json")))
  if len(found) != 1:
    raise FileNotFoundError(
        f"{where}: {len(found)} reports match eval/report_step*{suffix}.json ({found}); evaluate it with "
        f"`python -m launch.evaluate --workdir={where} --preset={preset}"
        + (f" --num_examples={num_examples}" if num_examples else "") + "` or pass the report's .json path")
  return found[0]


def load_per_example(path: str) -> tuple[dict, dict]:
  """``(report, {"worst_case": bool [n], "indices": int [n], "row/<name>": bool [n], ...})``."""
  report = json.load(open(path))
  npz = path[:-len(".json")] + ".npz"
  if not os.path.exists(npz):
    raise FileNotFoundError(
        f"{npz} is missing (reports written before per-example results were saved): re-run "
        f"`python -m launch.evaluate --workdir={report.get('workdir', '<workdir>')} --step={report.get('step', 'best')} "
        f"--preset={report.get('preset')} --num_examples={report.get('n')}`; cached rows take seconds")
  with np.load(npz) as f:
    arrays = {k: f[k] for k in f.files}
  return report, arrays


def compare_reports(path_a: str, path_b: str) -> dict:
  """Paired worst-case comparison of two reports; refuses reports on different test images."""
  ra, ea = load_per_example(path_a)
  rb, eb = load_per_example(path_b)
  for field in ("dataset", "split", "eps", "norm"):
    if ra.get(field) != rb.get(field):
      raise ValueError(f"{path_a} and {path_b} differ in {field} ({ra.get(field)!r} vs {rb.get(field)!r}): "
                       "a paired comparison needs the same test images and threat model")
  if not np.array_equal(ea["indices"], eb["indices"]):
    raise ValueError(f"{path_a} and {path_b} cover different test images: evaluate both with the same "
                     "--num_examples")
  out = paired(ea["worst_case"], eb["worst_case"])
  for key, r, e in (("a", ra, ea), ("b", rb, eb)):
    if abs(float(e["worst_case"].mean()) - float(r["worst_case"]["accuracy"])) > 1e-9:
      raise ValueError(f"{path_a if key == 'a' else path_b}: its .npz does not match its report's worst case")
    out[f"objective_{key}"], out[f"report_{key}"] = r.get("objective"), (path_a if key == "a" else path_b)
  return out
