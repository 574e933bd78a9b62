"""AFA's Fig. 6 analysis: the fusion weight of a deployed stage-II model against attack
strength, and the rank correlation that says whether it rises with eps."""

from __future__ import annotations

import jax
import numpy as np

from agad.attacks import iterative as pgd_lib
from agad.defenses.afa import w0_per_example
from agad.objectives import base


def average_ranks(values: np.ndarray) -> np.ndarray:
  """Ranks 1..n of a 1-D array, ties sharing their average rank (Spearman's convention)."""
  values = np.asarray(values, np.float64)
  order = np.argsort(values, kind="stable")
  ranks = np.empty(len(values), np.float64)
  ranks[order] = np.arange(1, len(values) + 1)
  for v in np.unique(values):
    tie = values == v
    ranks[tie] = ranks[tie].mean()
  return ranks


def spearman(a, b) -> float:
  """Spearman rank correlation: Pearson's r of the average ranks (NaN if one is constant)."""
  ra, rb = average_ranks(a), average_ranks(b)
  ra, rb = ra - ra.mean(), rb - rb.mean()
  denom = np.sqrt(np.sum(ra * ra) * np.sum(rb * rb))
  return float(np.sum(ra * rb) / denom) if denom > 0 else float("nan")


def fusion_weight_vs_eps(model, variables, images, labels, key, *, eps_values, steps: int = 20,
                         step_ratio: float = 2.5, norm: str = "linf") -> dict:
  """The paper's Fig. 6 data: W1 = 1 - W0 of the deployed model against attack strength.

  For every ``eps`` in ``eps_values`` (0 = clean), PGD-``steps`` on CE through the
  deployed eval-mode model (step ``step_ratio * eps / steps``, uniform start), then
  W1 per example (mean over layers and channels). Returns ``{"eps": [n], "w1": [n, B],
  "w1_mean": [n], "spearman": rho}`` with rho the rank correlation of (eps, W1) over all
  n * B pairs (the paper: W1 rises with eps).
  """
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k not in ("params", "aux")}
  logits_fn = base.logits_fn_for(model, params, model_state, mode="eval")
  w1 = []
  for i, eps in enumerate(eps_values):
    x = images
    if eps > 0:
      x = pgd_lib.pgd(logits_fn, images, labels, jax.random.fold_in(key, i), eps=float(eps),
                      step_size=step_ratio * float(eps) / steps, steps=steps, norm=norm)
    out = base.forward(model, params, model_state, x, mode="eval")
    w1.append(1.0 - np.asarray(w0_per_example(out)))
  w1 = np.stack(w1)
  eps_rep = np.repeat(np.asarray(eps_values, np.float64), w1.shape[1])
  return {"eps": np.asarray(eps_values, np.float64), "w1": w1, "w1_mean": w1.mean(axis=1),
          "spearman": spearman(eps_rep, w1.reshape(-1))}
