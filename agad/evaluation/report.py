"""Report rendering: a Markdown table and plots of accuracy vs eps and vs PGD steps."""

from __future__ import annotations

import os

from agad.evaluation import checks

_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def headline(report: dict) -> str:
  """The number to quote: the per-example worst case over every attack at the report's eps
  (an image counts as robust only if every attack failed on it), with a note when the
  report has no AutoAttack row (a defense row needs ``--preset=table_aa``)."""
  w = report["worst_case"]
  over = list(w.get("over") or [])
  line = (
    f"worst case {100 * w['accuracy']:.2f}% +- {100 * w['stderr']:.2f} pp (n={w['n']}, eps "
    f"{report['eps']:.4g}; per image, robust only if every attack failed: {', '.join(over)})"
  )
  if not any(r.get("kind") == "autoattack" and r["attack"] in over for r in report["records"]):
    line += "; no AutoAttack row: a defense row needs --preset=table_aa"
  return line


def markdown(report: dict) -> str:
  dtype = _DTYPE_NAMES.get(str(report.get("dtype", "float32")), str(report.get("dtype")))
  lines = [
    f"Robustness of `{report.get('model', '?')}` ({report.get('objective', '?')}) on "
    f"{report.get('dataset', '?')} {report.get('split', 'test')}, n = {report['n']}, "
    f"eps = {report['eps']:.4g} ({report['norm']}), eval-mode BN, {dtype}"
    + (f" ({report['computed_here']})" if report.get("computed_here") else ""),
    "",
  ]
  lines += [f"**Number to quote: {headline(report)}**", ""]
  if report.get("before_quoting"):
    lines += ["**Before quoting it**", ""] + [f"- {w}" for w in report["before_quoting"]] + [""]
  if report.get("weights"):
    lines += [f"Weights: step {report.get('step', '?')}, {report['weights']}.", ""]
  v = report.get("verification") or {}
  if v.get("with"):
    lines += [
      f"Every row's stored adversarials re-verified by {v['with']} (eps slack "
      f"{v.get('slack', 1e-6):g}); accuracies count verified breaks only"
      + ("; randomised model" if report.get("stochastic") else "")
      + ".",
      "",
    ]
  lines += [
    "| attack | settings | accuracy (%) | stderr (pp) | n | wall time (s) |",
    "|---|---|---|---|---|---|",
  ]
  skip = {
    "attack",
    "kind",
    "n",
    "accuracy",
    "stderr",
    "wall_time_s",
    "cached_chunks",
    "per_attack",
    "over",
    "per_attack_time_s",
    "per_attack_note",
    "this_run_s",
    "computed_on",
    "flags",
    "unverified",
    "claimed_accuracy",
    "verification_failures",
  }
  for r in report["records"] + [report["worst_case"]]:
    settings = ", ".join(
      f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if k not in skip
    )
    wall = (
      f"{r['wall_time_s']:.0f}"
      if r.get("wall_time_s") is not None
      else ("(not cached)" if "wall_time_s" in r else "")
    )
    lines.append(
      f"| {r['attack']} | {settings} | {100 * r['accuracy']:.2f} | {100 * r['stderr']:.2f} "
      f"| {r['n']} | {wall} |"
    )
    stage_times = r.get("per_attack_time_s") or {}
    for stage, acc in (r.get("per_attack") or {}).items():
      t = f"{stage_times[stage]:.0f}" if stage in stage_times else ""
      lines.append(f"| &nbsp;&nbsp;after {stage} | | {100 * acc:.2f} | | | {t} |")
    if r.get("per_attack_note"):
      lines.append(f"| &nbsp;&nbsp;({r['per_attack_note']}) | | | | | |")
  here = report.get("computed_here")
  elsewhere = [
    f"- {r['attack']}: {', '.join(w for w in r['computed_on'] if w != here)}"
    for r in report["records"]
    if here and set(r.get("computed_on") or [here]) - {here}
  ]
  if elsewhere:
    lines += ["", f"**Rows read from cache entries computed elsewhere** (this run: {here})", ""]
    lines += elsewhere
  skipped = report.get("not_applicable") or []
  if report.get("warnings"):
    lines += ["", "**Warnings**", ""] + [f"- {w}" for w in report["warnings"]]
  elif skipped:
    lines += [
      "",
      "No applicable gradient-masking check fired (see below for those that "
      "could not run on these rows).",
    ]
  else:
    lines += ["", "No gradient-masking check fired."]
  if skipped:
    lines += ["", "**Checks not applicable to these rows**", ""] + [f"- {c}" for c in skipped]
  a = report.get("analysis")
  if a:
    lines += [
      "",
      f"**{a['name']}** ({a['ylabel']}) against {a['xlabel']}, n = {a['n']}, on the "
      f"attacked test images; rank correlation with eps {a['summary']['spearman_x_y']:.3f}",
      "",
      "| eps | mean | stderr |",
      "|---|---|---|",
    ]
    lines += [
      f"| {e:.4g} | {m:.4f} | {se:.4f} |" for e, m, se in zip(a["x"], a["y_mean"], a["y_stderr"])
    ]
  return "\n".join(lines) + "\n"


def _errorbar_png(
  plt,
  path: str,
  xs,
  ys,
  es,
  *,
  xlabel: str,
  ylabel: str,
  ylabel_size=None,
  title: str | None = None,
  log_x: bool = False,
) -> str:
  """One small error-bar figure written to ``path`` (returned)."""
  fig, ax = plt.subplots(figsize=(4.5, 3.2))
  ax.errorbar(xs, ys, yerr=es, marker="o", capsize=2)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel, fontsize=ylabel_size)
  if title:
    ax.set_title(title, fontsize=9)
  if log_x:
    ax.set_xscale("log")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plots(report: dict, directory: str) -> list[str]:
  """Accuracy vs eps and vs PGD steps (the suite's PGD-CE records); the objective's analysis
  against eps when the report has one."""
  # matplotlib only when plotting: the Agg backend must be chosen before pyplot loads.
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # after the backend (above)

  written = []
  for sweep, key, label, rows in (
    ("eps", "eps", "eps", checks.eps_sweep(report)),
    ("steps", "steps", "PGD steps", checks.steps_sweep(report)),
  ):
    pts = sorted((r[key], 100 * r["accuracy"], 100 * r["stderr"]) for r in rows)
    if len(pts) < 2:
      continue
    xs, ys, es = zip(*pts)
    written.append(
      _errorbar_png(
        plt,
        os.path.join(directory, f"accuracy_vs_{sweep}.png"),
        xs,
        ys,
        es,
        xlabel=label,
        ylabel="robust accuracy (%)",
        log_x=sweep == "steps",
      )
    )
  a = report.get("analysis")
  if a:
    written.append(
      _errorbar_png(
        plt,
        os.path.join(directory, f"{a['name']}_vs_eps.png"),
        a["x"],
        a["y_mean"],
        a["y_stderr"],
        xlabel=a["xlabel"],
        ylabel=a["ylabel"],
        ylabel_size=8,
        title=f"rank correlation {a['summary']['spearman_x_y']:.3f} (n={a['n']})",
      )
    )
  return written
