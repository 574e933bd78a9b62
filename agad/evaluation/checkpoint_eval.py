"""``evaluate(workdir, ...)``: the whole evaluation of a training run's checkpoint.

What ``python -m launch.evaluate`` does, as a library call: restore the checkpoint
(eval-mode BN, the model's compute dtype, "best" chosen on the validation split), build
the preset's attack specs from the run's ``eval`` config, run the cached suite on the
first ``num_examples`` test images (stored adversarials re-verified by a float32 forward
pass), and write the JSON report, Markdown table, plots and the per-example results (.npz,
for paired comparisons: ``python -m launch.compare``).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from agad import api
from agad.evaluation import checks, presets, report as report_lib, suite as suite_lib
from agad.evaluation.defaults import merged_eval_config, weights_to_evaluate
from agad.objectives.base import adaptive_variants


def write_json(path: str, payload: dict) -> None:
  """Writes ``payload`` atomically (a reader never sees a half-written report)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, default=lambda o: np.asarray(o).tolist())
  os.replace(tmp, path)


def write_npz(path: str, arrays: dict) -> None:
  """Writes per-example arrays atomically (``agad.evaluation.compare`` reads them)."""
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def evaluate(
  workdir: str,
  *,
  step: Any = "best",
  preset: str | None = None,
  num_examples: int | None = None,
  surrogate: str | None = None,
  output: str | None = None,
  chunk: int = 1000,
  eval_config=None,
  log: Callable | None = print,
) -> tuple[dict, str]:
  """Evaluates ``workdir``'s checkpoint; returns ``(report, path stem of the files)``.

  Args:
    workdir: training workdir (``config.json`` and ``checkpoints/``).
    step: ``"best"`` (validation metric), ``"latest"`` or a step number.
    preset: ``pgd | table | table_aa | full | autoattack | ladder`` (default: the run's ``eval.preset``).
    num_examples: first N test images (default: ``eval.num_examples``; None = all).
    surrogate: workdir of a surrogate model for the transfer attack.
    output: report directory (default ``WORKDIR/eval``; the cache lives under it).
    chunk: examples per cache entry (an interrupted run resumes chunk by chunk).
    eval_config: an ``eval`` ConfigDict overriding the saved one.
  """
  saved = api.load_config(workdir)
  # Workdirs saved before a field existed still evaluate: defaults under the saved values,
  # then the caller's overrides (unknown keys are an error).
  eval_cfg = merged_eval_config(saved.get("eval"), eval_config)
  preset = preset or eval_cfg.preset
  if preset not in presets.PRESETS:
    raise ValueError(f"preset {preset!r} is not one of {presets.PRESETS}")
  weights, weights_note = weights_to_evaluate(eval_cfg, saved)
  loaded = api.load(workdir, step, params=weights, config=saved)
  test = loaded.splits().test
  n = num_examples or eval_cfg.num_examples
  indices = None if n is None else list(range(min(int(n), len(test))))
  adaptive_factory = loaded.objective().adaptive_loss
  adaptive = adaptive_factory(loaded.model, loaded.variables) if adaptive_factory else None
  surrogate_fn = api.load(surrogate, "best").logits_fn if surrogate else None
  specs = presets.build_specs(
    eval_cfg,
    preset=preset,
    adaptive=tuple(adaptive_variants(adaptive) or ()),
    surrogate=surrogate_fn is not None,
  )
  out_dir = output or os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  model_hash = suite_lib.params_hash(loaded.variables)
  dtype, fingerprint = str(saved.model.get("dtype", "float32")), _fingerprint(saved, weights)
  log = log or (lambda *_: None)
  log(
    f"evaluating {workdir} step {loaded.step} ({weights_note}, hash {model_hash}) on "
    f"{len(test) if indices is None else len(indices)} test images at eps {float(eval_cfg.eps):.6g} "
    f"({255 * float(eval_cfg.eps):.3g}/255): " + ", ".join(s.name for s in specs)
  )
  report = suite_lib.run_suite(
    loaded.logits_fn,
    test,
    specs,
    eps=float(eval_cfg.eps),
    indices=indices,
    batch_size=int(eval_cfg.batch_size),
    seed=int(eval_cfg.seed),
    cache_dir=os.path.join(out_dir, "cache") if eval_cfg.cache else None,
    model_hash=model_hash,
    adaptive_loss=adaptive,
    surrogate=surrogate_fn,
    log=log,
    chunk=chunk,
    sweep_steps=int(eval_cfg.pgd_steps),
    dtype=dtype,
    fingerprint=fingerprint,
    verify_logits_fn=_float32_logits_fn(loaded, dtype),
    meta={
      "workdir": os.path.abspath(workdir),
      "step": loaded.step,
      "params": weights,
      "weights": weights_note,
      "dataset": saved.data.name,
      "num_classes": int(loaded.info.num_classes),
      "split": "test",
      "model": saved.model.name,
      "objective": saved.objective.name,
      "bn": "eval (running statistics)",
      "preset": preset,
    },
  )
  analysis = loaded.objective().analysis
  if preset == "ladder" and analysis is not None:
    report["analysis"] = run_analysis(
      analysis(loaded.model, loaded.variables),
      test,
      indices,
      eps_values=(0.0,) + tuple(f * float(eval_cfg.eps) for f in presets.ladder_factors(eval_cfg)),
      batch_size=int(eval_cfg.batch_size),
      seed=int(eval_cfg.seed),
      log=log,
    )
  report["before_quoting"] = checks.conclusion_warnings(report)  # near chance, small n
  stem = os.path.join(
    out_dir, f"report_step{loaded.step}_{preset}" + (f"_n{len(indices)}" if indices else "")
  )
  per_example = report.pop("per_example")
  report["per_example_file"] = os.path.basename(stem) + ".npz"
  if jax.process_index() == 0:  # a multi-process run: every process has the report, one writes
    write_npz(stem + ".npz", per_example)
    write_json(stem + ".json", report)
    with open(stem + ".md", "w") as f:
      f.write(report_lib.markdown(report))
    report_lib.plots(report, out_dir)
  return report, stem


def run_analysis(
  fn, source, indices, *, eps_values, batch_size: int, seed: int, log: Callable | None = None
) -> dict:
  """Runs an ``Objective.analysis`` function over the evaluated test images in batches
  (key ``fold_in(seed, batch index)``) and summarises it for the report: the per-eps mean
  and standard error of ``y`` and the function's ``summary`` (computed on every image)."""
  idx = np.arange(len(source.labels)) if indices is None else np.asarray(indices)
  key = jax.random.key(seed)
  parts = []
  for b, start in enumerate(range(0, len(idx), batch_size)):
    rows = idx[start : start + batch_size]
    images = source.images[rows].astype(np.float32) / np.float32(255)
    parts.append(fn(images, source.labels[rows], jax.random.fold_in(key, b), eps_values))
  y = np.concatenate([np.asarray(p["y"], np.float64) for p in parts], axis=1)  # [n, B]
  x = np.asarray(parts[0]["x"], np.float64)
  out = {k: parts[0][k] for k in ("name", "xlabel", "ylabel")}
  out.update(
    x=x.tolist(),
    y_mean=y.mean(axis=1).tolist(),
    y_stderr=(y.std(axis=1, ddof=1) / np.sqrt(y.shape[1])).tolist()
    if y.shape[1] > 1
    else [0.0] * len(x),
    n=int(y.shape[1]),
    summary={
      "spearman_x_y": float(
        scipy.stats.spearmanr(np.repeat(x, y.shape[1]), y.reshape(-1)).statistic
      )
    },
  )
  if log:
    log(
      f"analysis {out['name']}: mean "
      + ", ".join(f"{v:.4f} at eps {e:.4g}" for e, v in zip(x, out["y_mean"]))
      + f"; rank correlation with eps {out['summary']['spearman_x_y']:.3f} (n={out['n']})"
    )
  return out


def _fingerprint(saved, weights) -> str:
  """The model definition and data the cache entries depend on (beyond the weights)."""
  parts = {
    "model": saved.model.to_dict(),
    "data": saved.data.get("name"),
    "objective": saved.objective.to_dict(),
    "params": weights,
  }
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _float32_logits_fn(loaded, dtype: str):
  """A float32 forward pass of the loaded model for re-verification (None if it is one)."""
  if dtype == "float32" or not hasattr(loaded.model, "clone"):
    return None
  return api.make_logits_fn(loaded.model.clone(dtype=jnp.float32), loaded.variables)
