"""Attack lists for ``launch.evaluate`` built from ``config.eval``.

Every preset adds the defense's adaptive attacks (one PGD-k per adaptive-loss variant the
objective declares), so no preset reports PGD alone for a defense that has its own attack.

``pgd``: clean + PGD-k (fast; the main job's report) + adaptive.
``table``: clean, PGD-k, C&W-inf (the objectives comparison) + adaptive.
``table_aa``: ``table`` plus AutoAttack, so the report's worst case covers all of them (the
cached ``table`` attacks are reused).
``autoattack``: clean, adaptive, AutoAttack.
``ladder``: ``table_aa`` plus FGSM, PGD-k at every strength of ``eval.ladder`` (factors of
``eval.eps``; default AFA's {1, 2, 4, 8}/8), transfer from a surrogate (if given), and the
objective's analysis against eps when it declares one (AFA: its fusion weight, Fig. 6).
``full``: clean, FGSM, PGD-k, PGD-100, PGD-k x 5 restarts, MIM-k (mu 1, step eps/k), C&W-inf (PGD on the
kappa-clipped margin), the defense's adaptive attack (if it has one), transfer from a
surrogate (if given), AutoAttack, PGD-k at eps x {0.25, 0.5, 1.5, 2} and at eps = 0.5
(the sweep), PGD at 1, 5 and 10 steps (the steps curve).
"""

from __future__ import annotations

from agad.evaluation.suite import AttackSpec

PRESETS = ("pgd", "table", "table_aa", "full", "autoattack", "ladder")


def adaptive_specs(variants, eps: float, step: float, k: int) -> list[AttackSpec]:
  """One PGD-k spec per adaptive-loss variant: ``adaptive-pgd-k`` for ``""``, else
  ``adaptive-<variant>-pgd-k``; ``variants`` True means the single default one."""
  if variants is True:
    variants = ("",)
  return [
    AttackSpec.make(
      f"adaptive-{v + '-' if v else ''}pgd-{k}",
      "adaptive",
      eps=eps,
      step_size=step,
      steps=k,
      **({"variant": v} if v else {}),
    )
    for v in (variants or ())
  ]


def ladder_factors(eval_cfg) -> tuple[float, ...]:
  """``eval.ladder``: increasing factors of ``eval.eps`` in (0, 1], the last one 1."""
  return tuple(float(f) for f in eval_cfg.ladder)


def build_specs(
  eval_cfg, *, preset: str, adaptive=False, surrogate: bool = False
) -> list[AttackSpec]:
  """``adaptive``: False, True (one adaptive loss) or the defense's variant names."""
  if preset not in PRESETS:
    raise ValueError(f"eval preset {preset!r} is not one of {PRESETS}")
  eps, step, k = float(eval_cfg.eps), float(eval_cfg.step_size), int(eval_cfg.pgd_steps)
  pgd = lambda steps, e=eps, restarts=1, size=None: AttackSpec.make(
    f"pgd-{steps}"
    + (f"x{restarts}" if restarts > 1 else "")
    + (f"@eps={e:.4g}" if e != eps else ""),
    "pgd",
    eps=e,
    step_size=size if size is not None else step * e / eps,
    steps=steps,
    restarts=restarts,
    loss="ce",
    random_start="uniform",
  )
  clean = AttackSpec.make("clean", "clean", eps=eps)
  cw = AttackSpec.make(
    f"cw-{eval_cfg.cw_steps}",
    "cw",
    eps=eps,
    step_size=float(eval_cfg.cw_step_size),
    steps=int(eval_cfg.cw_steps),
    kappa=float(eval_cfg.cw_kappa),
  )
  # Every preset runs the defense's adaptive attacks: PGD alone can sit far above them.
  adaptive_spec = adaptive_specs(adaptive, eps, step, k)
  if preset == "pgd":
    return [clean, pgd(k, restarts=int(eval_cfg.restarts)), *adaptive_spec]
  if preset == "table":
    return [clean, pgd(k), cw, *adaptive_spec]
  aa = AttackSpec.make(
    f"autoattack-{eval_cfg.aa_version}", "autoattack", eps=eps, version=str(eval_cfg.aa_version)
  )
  if preset == "autoattack":
    return [clean, *adaptive_spec, aa]
  if preset == "table_aa":
    return [clean, pgd(k), cw, *adaptive_spec, aa]
  transfer = (
    [AttackSpec.make(f"transfer-pgd-{k}", "transfer", eps=eps, step_size=step, steps=k)]
    if surrogate
    else []
  )
  if preset == "ladder":
    rungs = [pgd(k, e=f * eps) for f in ladder_factors(eval_cfg) if f != 1.0]
    return [
      clean,
      AttackSpec.make("fgsm", "fgsm", eps=eps),
      pgd(k),
      *rungs,
      cw,
      *adaptive_spec,
      *transfer,
      aa,
    ]
  specs = [
    clean,
    AttackSpec.make("fgsm", "fgsm", eps=eps),
    pgd(k),
    pgd(100),
    pgd(k, restarts=5),
    AttackSpec.make(f"mim-{k}", "mim", eps=eps, steps=k, decay=1.0),
    cw,
  ]
  specs += adaptive_spec + transfer
  specs.append(aa)
  # The eps sweep keeps step/eps fixed; eps = 0.5 must drive accuracy to ~0.
  specs += [pgd(k, e=f * eps) for f in (0.25, 0.5, 1.5, 2.0)] + [pgd(k, e=0.5, size=0.05)]
  specs += [pgd(s) for s in (1, 5, 10) if s != k]
  return specs
