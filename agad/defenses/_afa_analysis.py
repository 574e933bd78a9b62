"""AFA's analyses: the fusion weight of a deployed stage-II model against attack strength
and the rank correlation that says whether it rises with eps (Fig. 6); and a stage-I run's
accuracy under fixed branch routings (the ceiling of what stage II can reach).

``python tools/afa_branches.py --workdir=<stage-I run>`` prints the routing sweep."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from agad.attacks import iterative as pgd_lib
from agad.defenses._afa_norm import w0_per_example
from agad.objectives import base


def average_ranks(values: np.ndarray) -> np.ndarray:
  """Ranks 1..n of a 1-D array, ties sharing their average rank (Spearman's convention)."""
  return scipy.stats.rankdata(np.asarray(values, np.float64), method="average")


def spearman(a, b) -> float:
  """Spearman rank correlation (NaN if one side is constant)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if np.all(a == a.flat[0]) or np.all(b == b.flat[0]):
    return float("nan")
  return float(scipy.stats.spearmanr(a, b).statistic)


def fusion_weight_vs_eps(
  model,
  variables,
  images,
  labels,
  key,
  *,
  eps_values,
  steps: int = 20,
  step_ratio: float = 2.5,
  norm: str = "linf",
) -> dict:
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
      x = pgd_lib.pgd(
        logits_fn,
        images,
        labels,
        jax.random.fold_in(key, i),
        eps=float(eps),
        step_size=step_ratio * float(eps) / steps,
        steps=steps,
        norm=norm,
      )
    out = base.forward(model, params, model_state, x, mode="eval")
    w1.append(1.0 - np.asarray(w0_per_example(out)))
  w1 = np.stack(w1)
  eps_rep = np.repeat(np.asarray(eps_values, np.float64), w1.shape[1])
  rho = spearman(eps_rep, w1.reshape(-1))
  return {
    "eps": np.asarray(eps_values, np.float64),
    "w1": w1,
    "w1_mean": w1.mean(axis=1),
    "spearman": rho,
    # The Objective.analysis fields (launch.evaluate --preset=ladder plots them).
    "name": "fusion_weight",
    "xlabel": "eps (PGD-%d)" % steps,
    "ylabel": "W1 = 1 - W0 (weight of the robust branch)",
    "x": np.asarray(eps_values, np.float64),
    "y": w1,
    "summary": {"spearman_eps_w1": rho},
  }


def analysis(model, variables):
  """``Objective.analysis`` of AFA stage II: :func:`fusion_weight_vs_eps`."""

  def fn(images, labels, key, eps_values):
    return fusion_weight_vs_eps(model, variables, images, labels, key, eps_values=eps_values)

  return fn


def default_mixes(num_branches: int, weights=(0.75, 0.5, 0.25)) -> dict[str, np.ndarray]:
  """Fixed routings of a stage-I run: each branch alone (``BN_k``), then the stage-II pair
  ``w BN_0 + (1 - w) BN_{K-1}`` for each ``w`` in ``weights``."""
  eye = np.eye(num_branches, dtype=np.float32)
  mixes = {f"BN_{k}": eye[k] for k in range(num_branches)}
  for w in weights:
    mixes[f"{w:g} BN_0 + {1 - w:g} BN_{num_branches - 1}"] = w * eye[0] + (1 - w) * eye[-1]
  return mixes


def fixed_mix_sweep(
  model,
  variables,
  images,
  labels,
  key,
  *,
  mixes,
  eps_values,
  steps: int = 20,
  step_ratio: float = 2.5,
  norm: str = "linf",
) -> dict:
  """Accuracy of a stage-I run under FIXED branch routings, clean and under white-box PGD.

  Stage II can only help if the best fixed routing differs between clean and attacked
  inputs: this sweep gives that ceiling. For each routing ``mixes[name]`` (``[K]``
  weights, the same for every example: ``norm_ctx={'mix': w}`` in eval mode) and each
  ``eps`` in ``eps_values`` (0 = clean): PGD-``steps`` on CE through that routing (step
  ``step_ratio * eps / steps``, uniform start, key ``fold_in(key, i)`` for the i-th eps,
  the same for every routing), then per-example correctness.

  Returns ``{"names": [M], "eps": [E], "correct": bool [M, E, B], "accuracy": [M, E],
  "best_fixed": [E]}`` (``best_fixed``: for each eps the best routing's accuracy, the most
  a per-strength choice of routing could reach; not a per-example oracle).
  """
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k not in ("params", "aux")}
  names = list(mixes)
  b = images.shape[0]
  correct = np.zeros((len(names), len(eps_values), b), bool)
  for m, name in enumerate(names):
    w = np.asarray(mixes[name], np.float32)
    if w.ndim != 1:
      raise ValueError(f"mix {name!r} has shape {w.shape}: give one weight per branch, shape [K]")
    ctx = {"mix": jnp.broadcast_to(w, (b,) + w.shape)}
    logits_fn = jax.jit(base.logits_fn_for(model, params, model_state, mode="eval", norm_ctx=ctx))
    for i, eps in enumerate(eps_values):
      x = images
      if eps > 0:
        x = pgd_lib.pgd(
          logits_fn,
          images,
          labels,
          jax.random.fold_in(key, i),
          eps=float(eps),
          step_size=step_ratio * float(eps) / steps,
          steps=steps,
          norm=norm,
        )
      correct[m, i] = np.asarray(jnp.argmax(logits_fn(x), -1) == labels)
  accuracy = correct.mean(axis=-1)
  return {
    "names": names,
    "eps": np.asarray(eps_values, np.float64),
    "correct": correct,
    "accuracy": accuracy,
    "best_fixed": accuracy.max(axis=0),
  }
