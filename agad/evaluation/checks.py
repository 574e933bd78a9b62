"""Automatic gradient-masking and evaluation-sanity checks (warnings in the report).

After Carlini et al. 2019, Athalye et al. 2018 and AutoAttack's flags: each check
returns human-readable warnings; an empty list means nothing suspicious was seen.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from agad import data as data_lib
from agad.attacks import driver as driver_lib
from agad.attacks import losses
from agad.evaluation.compare import chance_note

WHITE_BOX = ("fgsm", "pgd", "cw", "adaptive", "apgd-ce", "apgd-t", "fab-t", "autoattack")
BLACK_BOX = ("square", "transfer")


def _by_kind(records, kinds):
  return [r for r in records if r.get("kind") in kinds]


def _pp(a: float, b: float) -> float:
  """``100 (a - b)`` for accuracies in [0, 1], rounded to 1e-9 pp: counts / n differ from the
  thresholds by float noise (0.641 - 0.601 is 4.0000000000000036 pp), and a gap exactly at a
  threshold must not fire a check that says "more than"."""
  return round(100.0 * (a - b), 9)


def report_warnings(
  report: dict,
  *,
  aa_gap_pp: float = 4.0,
  converge_pp: float = 1.0,
  blackbox_pp: float = 0.2,
  sweep_tolerance_pp: float = 0.5,
) -> list[str]:
  """Checks on the accuracies of a finished suite (see module docstring)."""
  w: list[str] = []
  records = report["records"]
  fgsm = _by_kind(records, ("fgsm",))
  main_steps = report.get("sweep_steps") or 0
  # Only attacks whose budget reaches the ball's boundary (steps x step >= eps), and PGD
  # with at least the report's k steps, are held to FGSM and AutoAttack: the steps
  # curve's PGD-1/5/10 are there to show convergence, not to be strong.
  reaches = lambda r: (
    r.get("step_size") is None
    or r.get("steps") is None
    or r["steps"] * r["step_size"] >= r["eps"] - 1e-9
  )
  iterative = [
    r
    for r in _by_kind(records, ("pgd", "cw", "apgd-ce"))
    if r.get("eps") == report["eps"]
    and reaches(r)
    and (r["kind"] != "pgd" or (r.get("steps") or 0) >= main_steps)
  ]
  for f in fgsm:
    for r in iterative:
      if _pp(r["accuracy"], f["accuracy"]) > 0.5:
        w.append(
          f"iterative attack {r['attack']} ({100 * r['accuracy']:.2f}%) is weaker than "
          f"FGSM ({100 * f['accuracy']:.2f}%): gradients may be masked or the step size is wrong"
        )
  white = [r for r in _by_kind(records, WHITE_BOX) if r.get("eps") == report["eps"]]
  best_white = min((r["accuracy"] for r in white), default=None)
  for r in _by_kind(records, BLACK_BOX):
    if (
      r.get("eps") == report["eps"]
      and best_white is not None
      and _pp(best_white, r["accuracy"]) > blackbox_pp
    ):
      w.append(
        f"black-box {r['attack']} ({100 * r['accuracy']:.2f}%) beats every white-box attack "
        f"(best {100 * best_white:.2f}%): a sign of gradient masking"
      )
  # Convergence and the AutoAttack gap: the main PGD (>= the report's k steps) and beyond.
  pgd = {
    (r.get("steps"), r.get("restarts", 1), r.get("loss", "ce")): r
    for r in _by_kind(records, ("pgd",))
    if r.get("eps") == report["eps"] and (r.get("steps") or 0) >= main_steps and reaches(r)
  }
  for (steps, restarts, loss), r in pgd.items():
    for (s2, r2, l2), other in pgd.items():
      if l2 == loss and ((s2 > steps and r2 == restarts) or (r2 > restarts and s2 == steps)):
        drop = _pp(r["accuracy"], other["accuracy"])
        if drop > converge_pp:
          w.append(
            f"{r['attack']} -> {other['attack']}: accuracy still falls by {drop:.2f} pp "
            f"(> {converge_pp} pp): the attack has not converged"
          )
  aa = [r for r in _by_kind(records, ("autoattack",))]
  for a in aa:
    for (steps, restarts, loss), r in pgd.items():
      gap = _pp(r["accuracy"], a["accuracy"])
      if loss == "ce" and gap > aa_gap_pp:
        w.append(
          f"PGD-CE ({r['attack']}, {100 * r['accuracy']:.2f}%) is {gap:.2f} pp above "
          f"AutoAttack ({100 * a['accuracy']:.2f}%): PGD alone overstates robustness here"
        )
  sweep = sorted((r["eps"], 100 * r["accuracy"]) for r in eps_sweep(report))
  for (e1, a1), (e2, a2) in zip(sweep, sweep[1:]):
    if _pp(a2 / 100, a1 / 100) > sweep_tolerance_pp:
      w.append(
        f"accuracy rises with eps ({a1:.2f}% at {e1:.4g} -> {a2:.2f}% at {e2:.4g}): "
        "the attack is failing at larger radii"
      )
  for e, a in sweep:
    if e >= 0.5 and a > 1.0:
      w.append(
        f"accuracy {a:.2f}% at eps={e:.4g} (>= 0.5) should be ~0: unbounded attacks must succeed"
      )
  v = report.get("verification") or {}
  bad = {
    k: v[k] for k in ("nonfinite", "outside_ball", "outside_box", "not_misclassified") if v.get(k)
  }
  if bad:
    w.append(f"re-verification of stored adversarial examples failed: {bad} of {v.get('checked')}")
  for r in records:
    if r.get("unverified"):
      w.append(
        f"{r['attack']}: {r['unverified']} stored adversarials failed re-verification "
        f"({r.get('verification_failures')}) and were not counted: accuracy "
        f"{100 * r.get('claimed_accuracy', r['accuracy']):.2f}% -> {100 * r['accuracy']:.2f}%"
      )
    for flag in r.get("flags") or ():  # AutoAttack's own flags.
      w.append(f"{r['attack']}: {flag}")
  return w


def conclusion_warnings(report: dict, *, table_n: int = 1000) -> list[str]:
  """Reasons not to quote the report yet: clean accuracy near chance, and fewer than
  ``table_n`` images (the worst case's standard error then hides differences of several pp)."""
  w = []
  note = chance_note(report)
  if note:
    w.append(note)
  worst = report.get("worst_case") or {}
  if report.get("n", table_n) < table_n and worst.get("stderr") is not None:
    se = 100 * worst["stderr"]
    w.append(
      f"n={report['n']}: the worst case's standard error is {se:.2f} pp, so two runs evaluated "
      f"like this differing by less than ~{2 * math.sqrt(2) * se:.1f} pp cannot be told apart "
      f"(launch.compare's paired error is smaller); a table row needs --num_examples={table_n} or more"
    )
  return w


def _aa_with_square(records, eps) -> list[dict]:
  """AutoAttack rows at ``eps`` that ran Square after white-box stages (standard and plus
  do; rand does not). Square there attacks only what the white-box stages left robust, so
  it cannot score below them; AutoAttack's own flag ("Square lowered robust accuracy ...
  gradient masking?", among the report's warnings) is the black-box check instead."""

  def runs_square(r):
    stages = list(r.get("per_attack") or {}) or list(r.get("attacks") or ())
    if stages:
      return "square" in stages[1:]
    return r.get("version", "standard") in ("standard", "plus")

  return [
    r for r in _by_kind(records, ("autoattack",)) if r.get("eps") in (None, eps) and runs_square(r)
  ]


def not_applicable(report: dict) -> list[str]:
  """The masking checks of :func:`report_warnings` that these records cannot support,
  each with the rows it needs: a silent check there is no evidence of anything."""
  records, eps, main = report["records"], report["eps"], report.get("sweep_steps") or 0
  at_eps = lambda kinds: [r for r in _by_kind(records, kinds) if r.get("eps") == eps]
  pgd = [r for r in at_eps(("pgd",)) if (r.get("steps") or 0) >= main]
  variants = {(r.get("steps"), r.get("restarts", 1), r.get("loss", "ce")) for r in pgd}
  converge = any(
    l2 == l and ((s2 > s and r2 == r) or (r2 > r and s2 == s))
    for s, r, l in variants
    for s2, r2, l2 in variants
  )
  sweep = sorted({r["eps"] for r in eps_sweep(report)})
  out = []
  if not at_eps(("fgsm",)):
    out.append("iterative vs FGSM (needs an FGSM row)")
  if not at_eps(BLACK_BOX) and not _aa_with_square(records, eps):
    out.append(
      "black-box vs white-box (needs a Square or transfer row, or an AutoAttack row whose "
      "Square stage runs after its white-box stages: its own flag then reports breaks they missed)"
    )
  if not converge:
    out.append("PGD convergence (needs PGD rows with more steps or restarts)")
  if not _by_kind(records, ("autoattack",)):
    out.append("PGD vs AutoAttack gap and AutoAttack's own flags (needs an AutoAttack row)")
  if len(sweep) < 2:
    out.append("accuracy vs eps monotone (needs PGD rows at several eps)")
  if not any(e >= 0.5 for e in sweep):
    out.append("unbounded attack succeeds (needs a PGD row at eps >= 0.5)")
  return out


def eps_sweep(report: dict) -> list[dict]:
  """PGD-CE records with the sweep's step count and one restart, at several eps."""
  steps = report.get("sweep_steps")
  return [
    r
    for r in _by_kind(report["records"], ("pgd",))
    if r.get("steps") == steps and r.get("restarts", 1) == 1 and r.get("loss", "ce") == "ce"
  ]


def steps_sweep(report: dict) -> list[dict]:
  """PGD-CE records at the main eps with one restart, at several step counts."""
  return [
    r
    for r in _by_kind(report["records"], ("pgd",))
    if r.get("eps") == report["eps"] and r.get("restarts", 1) == 1 and r.get("loss", "ce") == "ce"
  ]


def input_gradient_stats(logits_fn, images, labels) -> dict:
  """Fractions of examples whose CE input gradient is exactly zero (``zero``) or
  non-finite (``nonfinite``), and of examples with a zero gradient that share one exact
  logit vector with others (``constant``: the largest such group; a constant-output region,
  e.g. a hidden ReLU layer with every unit off, rather than a saturated softmax, whose
  logits still differ per example)."""

  def loss(f, x, y):
    z = f(x)
    return jnp.sum(losses.cross_entropy(z, y)), z

  (_, logits), grad = jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True))(
    logits_fn, images, labels
  )
  flat = np.asarray(grad).reshape(len(images), -1)
  zero = np.all(flat == 0, axis=1)
  constant = 0.0
  if zero.sum() > 1:
    _, counts = np.unique(np.asarray(logits)[zero], axis=0, return_counts=True)
    constant = float(counts.max()) / len(images) if counts.max() > 1 else 0.0
  return {
    "zero": float(np.mean(zero)),
    "nonfinite": float(np.mean(~np.all(np.isfinite(flat), axis=1))),
    "constant": constant,
  }


def model_checks(
  logits_fn, source, indices, *, seed: int = 0, repeats: int = 5, stochastic: bool = False
) -> list[str]:
  """Checks on the model itself: probabilities for logits, zero / NaN input gradients
  and randomness.

  Repeated forward passes run eagerly (a host-side random model would hide behind a
  jit cache); a ``stochastic`` model is called with a different key each time.
  """
  logits_fn = driver_lib.as_partial(logits_fn)
  w: list[str] = []
  batch = data_lib.read_batch(source, np.asarray(indices))
  images = jnp.asarray(batch["image"], jnp.float32) / 255.0
  labels = jnp.asarray(batch["label"])
  grad_fn = (
    Partial(lambda f, k, x: f(x, k), logits_fn, jax.random.key(seed)) if stochastic else logits_fn
  )
  stats = input_gradient_stats(grad_fn, images, labels)
  if stats["nonfinite"] > 0:
    w.append(f"{100 * stats['nonfinite']:.1f}% of examples have non-finite input gradients")
  if stats["zero"] > 0.01:
    why = "quantisation or saturation masks gradients: use BPDA, EOT or a black-box attack"
    if stats["constant"] > 0.01:
      why = (
        f"{100 * stats['constant']:.1f}% of examples get one identical logit vector: a "
        "constant-output region, e.g. a hidden ReLU layer with every unit off (dead units); "
        "gradient attacks cannot move them, black-box attacks and best iterates can"
      )
    w.append(f"{100 * stats['zero']:.1f}% of examples have exactly zero input gradients ({why})")
  first = np.asarray(logits_fn(images, jax.random.key(seed)) if stochastic else logits_fn(images))
  if (
    first.ndim == 2
    and np.all(first >= -1e-5)
    and np.all(first <= 1 + 1e-5)
    and np.allclose(first.sum(-1), 1.0, atol=1e-4)
  ):
    w.append(
      "the model's outputs look like probabilities (rows in [0, 1] summing to 1): "
      "attacks expect logits; pass the pre-softmax outputs"
    )
  if stochastic:
    outs = [np.asarray(logits_fn(images, jax.random.key(seed + i))) for i in range(repeats)]
  else:
    outs = [np.asarray(logits_fn(images)) for _ in range(repeats)]
  if any(not np.allclose(outs[0], o, atol=1e-5) for o in outs[1:]):
    w.append(
      "the model's outputs change across repeated forward passes: it is randomised; "
      "evaluate with EOT (version='rand')"
    )
  return w
