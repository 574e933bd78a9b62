"""The attack of each kind of report row, as the suite (``agad.evaluation.suite``) runs it.

``batch_runner(spec, ...)`` returns ``(x [B,H,W,C], y [B], key) -> x_adv [B,H,W,C]`` for
the per-batch kinds; ``run_autoattack(...)`` runs AutoAttack on a chunk and returns its
per-example results, stages and flags. PGD-family white-box rows (fgsm, pgd, mim, cw,
adaptive) keep the last misclassified iterate per example (``track_best``), as APGD does.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from agad.attacks import autoattack, iterative


def _misclassified(logits_fn, labels, x):
  return jnp.argmax(logits_fn(x), -1) != labels


def _pgd_like(
  logits_fn, x, y, key, kw, *, loss="ce", kappa=None, stochastic=False, track_best=True
):
  return iterative.pgd(
    logits_fn,
    x,
    y,
    key,
    eps=kw["eps"],
    step_size=kw["step_size"],
    steps=kw["steps"],
    norm=kw.get("norm", "linf"),
    random_start=kw.get("random_start", "uniform"),
    loss=loss,
    kappa=kappa,
    stochastic=stochastic,
    track_best=track_best,
  )


def _adaptive_loss_partial(adaptive_loss: Callable) -> Callable:
  """``labels -> Partial(x -> [B])`` with one stable function object (jit cache hits)."""
  fn = lambda labels, x: adaptive_loss(x, labels)
  return lambda labels: Partial(fn, labels)


def batch_runner(
  spec, logits_fn, *, adaptive_loss=None, surrogate=None, stochastic: bool = False
) -> Callable:
  """``(x, y, key) -> x_adv`` for the per-batch kinds; ``adaptive_loss`` is ``{variant: loss}``.

  ``stochastic``: ``logits_fn(x, key)`` is randomised; PGD-family attacks draw a fresh key
  per step. The adaptive loss (``(x, labels) -> [B]``) is called as given; on a randomised
  model its rows keep the final iterate (no deterministic success test exists there).
  """
  kw = spec.kw
  kind = spec.kind
  norm = kw.get("norm", "linf")
  if kind == "fgsm":
    return lambda x, y, k: iterative.fgsm(
      logits_fn, x, y, k, eps=kw["eps"], norm=norm, stochastic=stochastic, track_best=True
    )
  if kind == "pgd":
    return lambda x, y, k: _pgd_like(
      logits_fn, x, y, k, kw, loss=kw.get("loss", "ce"), stochastic=stochastic
    )
  if kind == "mim":
    return lambda x, y, k: iterative.mim(
      logits_fn,
      x,
      y,
      k,
      eps=kw["eps"],
      steps=kw["steps"],
      step_size=kw.get("step_size"),
      decay=kw.get("decay", 1.0),
      norm=norm,
      stochastic=stochastic,
      track_best=True,
    )
  if kind == "cw":
    return lambda x, y, k: _pgd_like(
      logits_fn, x, y, k, kw, loss="margin", kappa=kw.get("kappa", 50.0), stochastic=stochastic
    )
  if kind == "adaptive":
    if adaptive_loss is None:
      raise ValueError(f"attack {spec.name!r} needs the defense's adaptive loss; none was given")
    variant = kw.get("variant", "")
    if variant not in adaptive_loss:
      has = (
        "a single adaptive loss (variant '')"
        if set(adaptive_loss) == {""}
        else sorted(adaptive_loss)
      )
      raise ValueError(
        f"attack {spec.name!r} asks for adaptive-loss variant {variant!r}; the defense has {has}"
      )
    make = _adaptive_loss_partial(adaptive_loss[variant])
    success = (lambda y: None) if stochastic else (lambda y: Partial(_misclassified, logits_fn, y))
    return lambda x, y, k: iterative.pgd_general(
      make(y),
      x,
      k,
      eps=kw["eps"],
      step_size=kw["step_size"],
      steps=kw["steps"],
      norm=norm,
      random_start=kw.get("random_start", "uniform"),
      success_fn=success(y),
    )
  if kind == "transfer":
    if surrogate is None:
      raise ValueError(f"attack {spec.name!r} needs a surrogate logits_fn (--surrogate=WORKDIR)")
    # The surrogate's iterates: choosing among them by the target's output would query it.
    return lambda x, y, k: _pgd_like(
      surrogate, x, y, k, kw, loss=kw.get("loss", "ce"), track_best=False
    )
  from agad import attacks as attacks_lib  # The AutoAttack components.

  if kind == "square":
    return lambda x, y, k: attacks_lib.square(
      logits_fn,
      x,
      y,
      k,
      eps=kw["eps"],
      n_queries=kw.get("queries", 5000),
      p_init=kw.get("p_init", 0.8),
      norm=norm,
      stochastic=stochastic,
    )
  if kind == "apgd-ce":
    return lambda x, y, k: attacks_lib.apgd(
      logits_fn,
      x,
      y,
      k,
      eps=kw["eps"],
      steps=kw.get("steps", 100),
      loss="ce",
      norm=norm,
      stochastic=stochastic,
    )
  raise ValueError(f"unknown attack kind {kind!r} in {spec.name!r}")


RAND_ON_DETERMINISTIC = (
  "version 'rand' (EOT) was asked for on a deterministic model: ran "
  "'standard' instead (EOT only averages a randomised model's noise)"
)


def run_autoattack(
  spec,
  logits_fn,
  images,
  labels,
  key,
  *,
  batch_size: int,
  stochastic: bool = False,
  resume_path: str | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
  """AutoAttack on one chunk: ``(robust [n], adversarial [n,H,W,C], stages)``.

  ``stages``: ``order``, ``times``, ``broken_by`` [n], ``flags`` (AutoAttack's own
  warnings, plus a note when ``rand`` was replaced by ``standard`` on a deterministic
  model) and ``earlier_s`` (seconds spent before a resumed run). Optional spec settings:
  ``steps``, ``square_queries``, ``attacks`` (custom). ``resume_path``: AutoAttack's
  progress file (``autoattack``), so that an interrupted chunk goes on batch by batch.
  """
  kw = spec.kw
  version = kw.get("version", "standard")
  notes = []
  if version == "rand" and not stochastic:
    version = "standard"
    notes.append(RAND_ON_DETERMINISTIC)
  extra = {k: kw[k] for k in ("steps", "square_queries") if k in kw}
  if "attacks" in kw:
    extra["attacks"] = list(kw["attacks"])
  out = autoattack(
    logits_fn,
    images,
    labels,
    key,
    eps=kw["eps"],
    norm=kw.get("norm", "linf"),
    version=version,
    batch_size=batch_size,
    stochastic=stochastic,
    verbose=True,
    resume_path=resume_path,
    **extra,
  )
  stages = {
    "order": list(out["per_attack"]),
    "times": out["times"],
    "broken_by": np.asarray(out["broken_by"]).astype(str),
    "flags": notes + list(out["flags"]),
    "version_run": version,
    "earlier_s": out["resumed"]["earlier_s"] if out["resumed"] else 0.0,
  }
  return np.asarray(out["robust"]), np.asarray(out["adversarial"], np.float32), stages


def autoattack_stages(chunks: list[dict | None], starts: list[int]) -> dict:
  """Per-stage robust accuracy, wall time and flags of AutoAttack, over chunks.

  Exact, from each example's ``broken_by`` (the stage that first broke it): robust
  accuracy after stage s counts examples neither misclassified clean nor broken by any
  stage up to s. Chunks cached before stages were stored make the breakdown partial.
  Flags of several chunks are prefixed with the chunk's first example position.
  """
  known = [c for c in chunks if c is not None]
  if not known:
    return {"per_attack_note": "per-stage results not cached for these chunks"}
  order = known[0]["order"]
  broken_by = np.concatenate([np.asarray(c["broken_by"]).astype(str) for c in known])
  out = {
    "per_attack": {},
    "per_attack_time_s": {
      name: float(sum(c["times"].get(name, 0.0) for c in known)) for name in order
    },
  }
  for s, name in enumerate(order):
    gone = np.isin(broken_by, ["clean"] + order[: s + 1])
    out["per_attack"][name] = float(1.0 - gone.mean())
  if len(known) < len(chunks):
    out["per_attack_note"] = (
      f"per-stage figures over {int(broken_by.size)} examples of "
      f"{len(known)}/{len(chunks)} chunks (older cache entries lack them)"
    )
  where: dict[str, list[int]] = {}  # flag -> first positions of the chunks that raised it
  for c, start in zip(chunks, starts):
    for flag in (c or {}).get("flags", []):
      where.setdefault(flag, []).append(int(start))
  out["flags"] = [
    flag
    if len(at) == len(chunks)
    else f"{flag} (in the chunk{'s' if len(at) > 1 else ''} from example {', '.join(map(str, at))})"
    for flag, at in where.items()
  ]
  runs = {c.get("version_run") for c in known if c.get("version_run")}
  if runs:
    out["version_run"] = ",".join(sorted(runs))
  return out
