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
:func:`agad.evaluation.checkpoint_eval.evaluate` beside every JSON report (key ``worst_case``; one
key per row under ``row/<name>``).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from typing import Sequence

import numpy as np


def sign_test_p(k: int, m: int) -> float:
  """Exact two-sided binomial p-value of k successes in m trials at p = 1/2 (1.0 if m = 0)."""
  if m == 0:
    return 1.0
  tail = min(k, m - k)
  p = sum(math.comb(m, j) for j in range(tail + 1)) / 2.0**m
  return min(1.0, 2.0 * p)


def paired(a: np.ndarray, b: np.ndarray) -> dict:
  """Paired difference of two per-example correctness vectors (bool or {0, 1}) of equal length."""
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  if a.shape != b.shape or a.ndim != 1 or not a.size:
    raise ValueError(
      f"paired comparison needs two non-empty vectors of one length, got {a.shape} and {b.shape}"
    )
  d = a.astype(np.float64) - b.astype(np.float64)
  n = d.size
  a_only, b_only = int(np.sum(a & ~b)), int(np.sum(b & ~a))
  return {
    "n": n,
    "acc_a": float(a.mean()),
    "acc_b": float(b.mean()),
    "diff": float(d.mean()),
    "stderr": float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
    "a_only": a_only,
    "b_only": b_only,
    "p_value": sign_test_p(a_only, a_only + b_only),
  }


def pooled(pairs: Sequence[dict]) -> dict:
  """Equal-weight mean of per-seed paired differences, its standard error and the spread."""
  if not pairs:
    raise ValueError("pooled() needs at least one paired comparison")
  diffs = np.array([p["diff"] for p in pairs])
  se = math.sqrt(sum(p["stderr"] ** 2 for p in pairs)) / len(pairs)
  return {
    "seeds": len(pairs),
    "diff": float(diffs.mean()),
    "stderr": se,
    "min_diff": float(diffs.min()),
    "max_diff": float(diffs.max()),
  }


def _n_of(path: str) -> int | None:
  """N of ``report_step<S>_<preset>_n<N>.json`` (None: all test images)."""
  stem = os.path.basename(path)[: -len(".json")]
  tail = stem.rpartition("_")[2]
  return int(tail[1:]) if tail.startswith("n") and tail[1:].isdigit() else None


def reports_by_n(where: str, preset: str) -> dict:
  """``{N: [paths]}`` of ``where``'s ``eval/report_step*_{preset}[_nN].json`` (N None: all images);
  a report .json path is its own entry."""
  if where.endswith(".json"):
    return {_n_of(where): [where]}
  pattern = re.compile(rf"report_step\d+_{re.escape(preset)}(_n\d+)?\.json")
  out: dict = {}
  for path in sorted(glob.glob(os.path.join(where, "eval", "report_step*.json"))):
    if pattern.fullmatch(os.path.basename(path)):
      out.setdefault(_n_of(path), []).append(path)
  return out


def common_n(wheres: Sequence[str], preset: str) -> int | None:
  """The N every one of ``wheres`` has a ``preset`` report for (the largest if several;
  None: all test images). Raises ``FileNotFoundError`` naming what each one has."""
  found = {w: reports_by_n(w, preset) for w in wheres}
  shared = set.intersection(*(set(f) for f in found.values())) if found else set()
  if not shared:
    have = "; ".join(
      f"{w}: {', '.join('all' if n is None else f'n={n}' for n in f) or 'none'}"
      for w, f in found.items()
    )
    raise FileNotFoundError(
      f"no N with a {preset} report in every run ({have}): evaluate the runs that lack one with "
      f"`python -m launch.evaluate --workdir=DIR --preset={preset} --num_examples=N` (the same N for all), "
      "or pass --num_examples"
    )
  return None if None in shared else max(shared)


def warnings(pairs: Sequence[dict], pooled_result: dict | None = None) -> list[str]:
  """One line per reason not to conclude yet: a run with clean accuracy near chance, one seed
  pair only (retraining spread unknown), n below what the observed difference needs."""
  out = []
  for p in pairs:
    for key in ("a", "b"):
      note = p.get(f"chance_{key}")
      if note:
        out.append(f"{p.get(f'report_{key}')}: {note}")
    diff, se, n = abs(p["diff"]), p["stderr"], p["n"]
    if diff > 0 and math.isfinite(se) and se > 0:
      need = math.ceil(n * (2 * se / diff) ** 2)  # paired sd = se sqrt(n); diff = 2 sd / sqrt(need)
      if need > n:
        out.append(
          f"{p['objective_a']} vs {p['objective_b']}: n={n} is below the ~{need} images a "
          f"{100 * diff:.2f} pp difference needs to stand two paired standard errors from 0: "
          f"evaluate more images (--num_examples)"
        )
  if pooled_result is not None and pooled_result["seeds"] == 1:
    out.append(
      "one seed pair: the paired error is test-sampling noise of two fixed models; whether "
      "the difference survives retraining is unknown (train and evaluate a second seed of each)"
    )
  return out


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
      + (f" --num_examples={num_examples}" if num_examples else "")
      + "` or pass the report's .json path"
    )
  return found[0]


def load_per_example(path: str) -> tuple[dict, dict]:
  """``(report, {"worst_case": bool [n], "indices": int [n], "row/<name>": bool [n], ...})``."""
  report = json.load(open(path))
  npz = path[: -len(".json")] + ".npz"
  if not os.path.exists(npz):
    raise FileNotFoundError(
      f"{npz} is missing (reports written before per-example results were saved): re-run "
      f"`python -m launch.evaluate --workdir={report.get('workdir', '<workdir>')} --step={report.get('step', 'best')} "
      f"--preset={report.get('preset')} --num_examples={report.get('n')}`; cached rows take seconds"
    )
  with np.load(npz) as f:
    arrays = {k: f[k] for k in f.files}
  return report, arrays


def compare_reports(path_a: str, path_b: str) -> dict:
  """Paired worst-case comparison of two reports; refuses reports on different test images."""
  ra, ea = load_per_example(path_a)
  rb, eb = load_per_example(path_b)
  for field in ("dataset", "split", "eps", "norm"):
    if ra.get(field) != rb.get(field):
      raise ValueError(
        f"{path_a} and {path_b} differ in {field} ({ra.get(field)!r} vs {rb.get(field)!r}): "
        "a paired comparison needs the same test images and threat model"
      )
  if not np.array_equal(ea["indices"], eb["indices"]):
    raise ValueError(
      f"{path_a} and {path_b} cover different test images: evaluate both with the same "
      "--num_examples"
    )
  out = paired(ea["worst_case"], eb["worst_case"])
  for key, r in (("a", ra), ("b", rb)):
    note = chance_note(r)
    if note:
      out[f"chance_{key}"] = note
  for key, r, e in (("a", ra, ea), ("b", rb, eb)):
    if abs(float(e["worst_case"].mean()) - float(r["worst_case"]["accuracy"])) > 1e-9:
      raise ValueError(
        f"{path_a if key == 'a' else path_b}: its .npz does not match its report's worst case"
      )
    out[f"objective_{key}"], out[f"report_{key}"] = (
      r.get("objective"),
      (path_a if key == "a" else path_b),
    )
  return out


# Classes of the datasets agad reads (reports written before they recorded num_classes).
NUM_CLASSES = {
  "fashion_mnist": 10,
  "cifar10": 10,
  "cifar100": 100,
  "svhn_cropped": 10,
  "tiny_imagenet": 200,
}


def chance_note(report: dict) -> str | None:
  """A warning when the report's clean accuracy is below twice chance (the model has not
  learned much; its robust numbers say nothing about a defense), else None."""
  k = report.get("num_classes") or NUM_CLASSES.get(str(report.get("dataset")))
  clean = next((r for r in report.get("records", []) if r.get("kind") == "clean"), None)
  if not k or clean is None or clean["accuracy"] >= 2.0 / k:
    return None
  return (
    f"clean accuracy {100 * clean['accuracy']:.2f}% is near chance ({100 / k:.2g}% for {k} classes): "
    "the model has barely learned, so its robust accuracy says nothing about the defense "
    "(train longer, or check the data and learning rate)"
  )
