"""Clean and PGD robustness of a ``logits_fn`` on a data split, per example.

Accuracies come with their binomial standard error ``sqrt(p (1 - p) / n)``; the
robust verdict is the per-example worst case: an example counts as robust only if it
is classified correctly clean and after every restart.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from agad import data as data_lib
from agad.attacks import driver as driver_lib
from agad.attacks import iterative as pgd_lib
from agad.training import sharding as sharding_lib


def stderr(p: float, n: int) -> float:
  return math.sqrt(max(p * (1.0 - p), 0.0) / n) if n else float("nan")


def accuracy_record(correct: np.ndarray, **settings) -> dict:
  n = int(correct.size)
  p = float(correct.mean()) if n else float("nan")
  return {**settings, "n": n, "accuracy": p, "stderr": stderr(p, n)}


@jax.jit
def _predict(logits_fn, images):
  return jnp.argmax(logits_fn(images), -1)


def evaluate_pgd(logits_fn, source, *, eps: float, step_size: float, steps: int,
                 restarts: int = 1, batch_size: int = 500, indices=None, seed: int = 0,
                 random_start: str = "uniform", norm: str = "linf", loss: str = "ce",
                 mesh=None, log=print) -> dict:
  """Clean and PGD-``steps`` per-example correctness on ``source``.

  Returns ``{'clean': [N] bool, 'robust': [N] bool, 'clean_record', 'pgd_record'}``.
  Batches are padded to a fixed size so every attack program compiles once.
  """
  logits_fn = driver_lib.as_partial(logits_fn)
  mesh = mesh or sharding_lib.make_mesh()
  data_sharding = sharding_lib.data_sharded(mesh)
  batches = data_lib.eval_batches(source, batch_size=batch_size, multiple_of=mesh.devices.size,
                                  indices=indices, full_batches=True)
  clean_all, robust_all = [], []
  key = jax.random.key(seed)
  t0 = time.time()
  t_pgd = 0.0
  for i, batch in enumerate(batches):
    mask = batch.pop("mask").astype(bool)
    batch = data_lib.shard_batch(batch, data_sharding)
    labels = np.asarray(batch["label"])
    clean = np.asarray(_predict(logits_fn, batch["image"])) == labels
    robust = clean.copy()
    t1 = time.time()
    for r in range(restarts):
      adv = pgd_lib.pgd(logits_fn, batch["image"], batch["label"],
                        jax.random.fold_in(jax.random.fold_in(key, i), r), eps=eps,
                        step_size=step_size, steps=steps, norm=norm, random_start=random_start,
                        loss=loss)
      robust &= np.asarray(_predict(logits_fn, adv)) == labels
    t_pgd += time.time() - t1
    clean_all.append(clean[mask])
    robust_all.append(robust[mask])
    done = sum(c.size for c in clean_all)
    if log is not None:
      log(f"  evaluated {done}/{batches.num_examples}: clean {np.concatenate(clean_all).mean():.4f} "
          f"PGD-{steps} {np.concatenate(robust_all).mean():.4f} ({time.time() - t0:.0f} s)")
  clean_all = np.concatenate(clean_all)
  robust_all = np.concatenate(robust_all)
  settings = dict(eps=eps, norm=norm)
  return {
      "clean": clean_all, "robust": robust_all,
      "clean_record": accuracy_record(clean_all, attack="clean", **settings,
                                      wall_time_s=time.time() - t0 - t_pgd),
      "pgd_record": accuracy_record(robust_all, attack=f"pgd-{steps}", steps=steps,
                                    step_size=step_size, restarts=restarts, loss=loss,
                                    random_start=random_start, wall_time_s=t_pgd, **settings),
  }
