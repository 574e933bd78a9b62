"""The robustness suite: many attacks, one per-example worst case, cached and checked.

``evaluate(logits_fn, source, specs, ...)`` runs each ``AttackSpec`` on the same
examples, records per-example robustness (correct clean *and* after the attack), keeps
the first adversarial example found for every broken point, re-verifies all of them
with a separate fp32 forward pass, and returns a report with one record per attack
(settings, n, accuracy, standard error, wall time), the worst case over everything run,
and the gradient-masking warnings of ``agad.evaluation.checks``.

Per-example results are cached in ``cache_dir`` under
``sha256(checkpoint hash, attack spec, example indices of the chunk)``: a later run adds
attacks without redoing old ones, a long run resumes chunk by chunk, and a changed
checkpoint or setting never reuses stale results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from agad import data as data_lib
from agad.checkpoint import params_hash  # noqa: F401  (re-exported: agad.evaluation.params_hash)
from agad.attacks import driver as driver_lib
from agad.attacks import iterative
from agad.evaluation import robustness
from agad.objectives.base import adaptive_variants


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """One row of the report. ``kind`` picks the runner; ``settings`` are its arguments.

  kinds: clean, fgsm, pgd (loss ce|margin|dlr..., restarts), mim (momentum), cw (PGD on the
  kappa-clipped margin), adaptive (PGD on the defense's adaptive loss), transfer (PGD on
  a surrogate, evaluated on the target), square, apgd-ce, apgd-t, fab-t, autoattack.
  """
  name: str
  kind: str
  settings: tuple = ()  # sorted (key, value) pairs, hashable and JSON-able

  @staticmethod
  def make(name: str, kind: str, **settings) -> "AttackSpec":
    return AttackSpec(name, kind, tuple(sorted(settings.items())))

  @property
  def kw(self) -> dict:
    return dict(self.settings)


def _cache_key(model_hash: str, spec: AttackSpec, indices: np.ndarray, seed: int) -> str:
  payload = json.dumps({"model": model_hash, "name": spec.name, "kind": spec.kind,
                        "settings": spec.kw, "seed": seed}, sort_keys=True, default=str)
  h = hashlib.sha256(payload.encode())
  h.update(np.asarray(indices, np.int64).tobytes())
  return h.hexdigest()[:32]


@jax.jit
def _predict(logits_fn, images):
  return jnp.argmax(logits_fn(images), -1)


def _pgd_like(logits_fn, x, y, key, kw, *, loss="ce", kappa=None):
  return iterative.pgd(logits_fn, x, y, key, eps=kw["eps"], step_size=kw["step_size"],
                       steps=kw["steps"], norm=kw.get("norm", "linf"),
                       random_start=kw.get("random_start", "uniform"), loss=loss, kappa=kappa)


def _adaptive_loss_partial(adaptive_loss: Callable) -> Callable:
  """``labels -> Partial(x -> [B])`` with one stable function object (jit cache hits)."""
  fn = lambda labels, x: adaptive_loss(x, labels)
  return lambda labels: Partial(fn, labels)


def _batch_runner(spec: AttackSpec, logits_fn, *, adaptive_loss=None, surrogate=None) -> Callable:
  """``(x, y, key) -> x_adv`` for the per-batch kinds; ``adaptive_loss`` is ``{variant: loss}``."""
  kw = spec.kw
  kind = spec.kind
  if kind == "fgsm":
    return lambda x, y, k: iterative.fgsm(logits_fn, x, y, k, eps=kw["eps"], norm=kw.get("norm", "linf"))
  if kind == "pgd":
    return lambda x, y, k: _pgd_like(logits_fn, x, y, k, kw, loss=kw.get("loss", "ce"))
  if kind == "mim":
    return lambda x, y, k: iterative.mim(logits_fn, x, y, k, eps=kw["eps"], steps=kw["steps"],
                                         step_size=kw.get("step_size"), decay=kw.get("decay", 1.0),
                                         norm=kw.get("norm", "linf"))
  if kind == "cw":
    return lambda x, y, k: _pgd_like(logits_fn, x, y, k, kw, loss="margin", kappa=kw.get("kappa", 50.0))
  if kind == "adaptive":
    if adaptive_loss is None:
      raise ValueError(f"attack {spec.name!r} needs the defense's adaptive loss; none was given")
    variant = kw.get("variant", "")
    if variant not in adaptive_loss:
      has = ("a single adaptive loss (variant '')" if set(adaptive_loss) == {""}
             else sorted(adaptive_loss))
      raise ValueError(f"attack {spec.name!r} asks for adaptive-loss variant {variant!r}; the "
                       f"defense has {has}")
    make = _adaptive_loss_partial(adaptive_loss[variant])
    return lambda x, y, k: iterative.pgd_general(
        make(y), x, k, eps=kw["eps"], step_size=kw["step_size"], steps=kw["steps"],
        norm=kw.get("norm", "linf"), random_start=kw.get("random_start", "uniform"))
  if kind == "transfer":
    if surrogate is None:
      raise ValueError(f"attack {spec.name!r} needs a surrogate logits_fn (--surrogate=WORKDIR)")
    return lambda x, y, k: _pgd_like(surrogate, x, y, k, kw, loss=kw.get("loss", "ce"))
  from agad import attacks as attacks_lib  # The AutoAttack components (issue 3).
  if kind == "square":
    return lambda x, y, k: attacks_lib.square(logits_fn, x, y, k, eps=kw["eps"],
                                              n_queries=kw.get("queries", 5000),
                                              p_init=kw.get("p_init", 0.8),
                                              norm=kw.get("norm", "linf"))
  if kind == "apgd-ce":
    return lambda x, y, k: attacks_lib.apgd(logits_fn, x, y, k, eps=kw["eps"], steps=kw.get("steps", 100),
                                            loss="ce", norm=kw.get("norm", "linf"))
  raise ValueError(f"unknown attack kind {kind!r} in {spec.name!r}")


def _autoattack_stages(chunks: list[dict | None]) -> dict:
  """Per-stage robust accuracy and wall time of AutoAttack, aggregated over chunks.

  Exact, from each example's ``broken_by`` (the stage that first broke it): robust
  accuracy after stage s counts examples neither misclassified clean nor broken by any
  stage up to s. Chunks cached before stages were stored make the breakdown partial.
  """
  known = [c for c in chunks if c is not None]
  if not known:
    return {"per_attack_note": "per-stage results not cached for these chunks"}
  order = known[0]["order"]
  broken_by = np.concatenate([np.asarray(c["broken_by"]).astype(str) for c in known])
  out = {"per_attack": {}, "per_attack_time_s": {
      name: float(sum(c["times"].get(name, 0.0) for c in known)) for name in order}}
  for s, name in enumerate(order):
    gone = np.isin(broken_by, ["clean"] + order[:s + 1])
    out["per_attack"][name] = float(1.0 - gone.mean())
  if len(known) < len(chunks):
    out["per_attack_note"] = (f"per-stage figures over {int(broken_by.size)} examples of "
                              f"{len(known)}/{len(chunks)} chunks (older cache entries lack them)")
  return out


def compute_where() -> str:
  """The backend, device and matmul precision computing now (stored with each cache entry:
  a GPU's TF32 can flip a near-tie example against a CPU's float32)."""
  precision = jax.config.jax_default_matmul_precision or "default"
  return f"{jax.default_backend()}: {jax.devices()[0].device_kind}, {precision} matmul precision"


class Suite:
  """Runs specs on a fixed example set with caching; see module docstring."""

  def __init__(self, logits_fn, source, *, indices=None, batch_size: int = 500, seed: int = 0,
               cache_dir: str | None = None, model_hash: str | None = None,
               adaptive_loss: Callable | Mapping | None = None, surrogate=None, chunk: int = 1000,
               log: Callable | None = print, mesh=None, eps: float | None = None):
    from agad import sharding as sharding_lib
    self.logits_fn = driver_lib.as_partial(logits_fn)
    self.source = source
    self.indices = np.arange(len(source)) if indices is None else np.asarray(indices)
    self.batch_size, self.seed, self.chunk = batch_size, seed, max(chunk, batch_size)
    self.cache_dir = cache_dir
    self.model_hash = model_hash or "unhashed"
    self.adaptive_loss, self.surrogate = adaptive_variants(adaptive_loss), surrogate
    self.log = log or (lambda *_: None)
    self.mesh = mesh or sharding_lib.make_mesh()
    self.data_sharding = sharding_lib.data_sharded(self.mesh)
    # The threat model of the verdict: only attacks at this eps enter the worst case and
    # the stored adversarials (sweeps at other radii are reported, never combined).
    self.eps = eps
    self.where = compute_where()
    self.results: dict[str, dict] = {}
    self.adversarial: dict[int, np.ndarray] = {}  # position in indices -> adversarial image

  # ---------------------------------------------------------------- caching
  def _cache_path(self, spec, chunk_indices) -> str | None:
    if not self.cache_dir:
      return None
    os.makedirs(self.cache_dir, exist_ok=True)
    return os.path.join(self.cache_dir, _cache_key(self.model_hash, spec, chunk_indices, self.seed) + ".npz")

  # ---------------------------------------------------------------- running
  def _run_chunk_batched(self, spec, chunk_indices, key) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-example robust [n], and the adversarial images of broken points."""
    runner = None if spec.kind == "clean" else _batch_runner(
        spec, self.logits_fn, adaptive_loss=self.adaptive_loss, surrogate=self.surrogate)
    restarts = spec.kw.get("restarts", 1)
    robust_all, adv_all = [], []
    batches = data_lib.eval_batches(self.source, batch_size=self.batch_size,
                                    multiple_of=self.mesh.devices.size, indices=chunk_indices,
                                    full_batches=True)
    for b, batch in enumerate(batches):
      mask = batch.pop("mask").astype(bool)
      x = data_lib.shard_batch(batch["image"], self.data_sharding)
      y = data_lib.shard_batch(batch["label"], self.data_sharding)
      labels = batch["label"]
      robust = np.asarray(_predict(self.logits_fn, x)) == labels
      best = np.array(batch["image"])
      for r in range(restarts if runner else 0):
        adv = runner(x, y, jax.random.fold_in(jax.random.fold_in(key, b), r))
        ok = np.asarray(_predict(self.logits_fn, adv)) == labels
        newly = robust & ~ok
        best[newly] = np.asarray(adv)[newly]
        robust &= ok
      robust_all.append(robust[mask])
      adv_all.append(best[mask])
    return np.concatenate(robust_all), np.concatenate(adv_all)

  def _run_chunk_autoattack(self, spec, chunk_indices, key):
    from agad.attacks import autoattack
    batch = data_lib.read_batch(self.source, chunk_indices)
    images = batch["image"].astype(np.float32) / 255.0
    kw = spec.kw
    out = autoattack(self.logits_fn, images, batch["label"], key, eps=kw["eps"],
                     norm=kw.get("norm", "linf"), version=kw.get("version", "standard"),
                     batch_size=self.batch_size, verbose=True)
    stages = {"order": list(out["per_attack"]), "times": out["times"],
              "broken_by": np.asarray(out["broken_by"]).astype(str)}
    return np.asarray(out["robust"]), np.asarray(out["adversarial"], np.float32), stages

  def run(self, spec: AttackSpec) -> dict:
    """Runs (or loads from cache) one attack on all examples; returns its record."""
    t0 = time.time()
    robust, adv, cached_chunks, stages = [], [], 0, []
    compute_s: list[float | None] = []  # per chunk: seconds it took when computed
    where: set[str] = set()  # per chunk: where it was computed
    for c, start in enumerate(range(0, len(self.indices), self.chunk)):
      chunk_indices = self.indices[start:start + self.chunk]
      path = self._cache_path(spec, chunk_indices)
      if path and os.path.exists(path):
        with np.load(path) as f:
          r, a = f["robust"], f["adversarial"]
          compute_s.append(float(f["wall_s"]) if "wall_s" in f else None)
          where.add(str(f["computed_on"]) if "computed_on" in f else "unrecorded")
          if spec.kind == "autoattack":  # Entries written before stages were cached lack them.
            stages.append(json.loads(str(f["stages"])) if "stages" in f else None)
            if stages[-1] is not None:
              stages[-1]["broken_by"] = f["broken_by"]
        cached_chunks += 1
      else:
        key = jax.random.fold_in(jax.random.key(self.seed), c)
        chunk_t0 = time.time()
        if spec.kind == "autoattack":
          r, a, chunk_stages = self._run_chunk_autoattack(spec, chunk_indices, key)
          stages.append(chunk_stages)
          extra = {"broken_by": chunk_stages["broken_by"],
                   "stages": json.dumps({k: chunk_stages[k] for k in ("order", "times")})}
        else:
          r, a = self._run_chunk_batched(spec, chunk_indices, key)
          extra = {}
        compute_s.append(time.time() - chunk_t0)
        extra["wall_s"] = compute_s[-1]
        extra["computed_on"] = self.where
        where.add(self.where)
        if path:
          tmp = path + ".tmp.npz"
          np.savez(tmp, robust=r, adversarial=a, **extra)
          os.replace(tmp, path)
      robust.append(r)
      adv.append(a)
      done = start + len(chunk_indices)
      self.log(f"  {spec.name}: {done}/{len(self.indices)} accuracy so far "
               f"{np.concatenate(robust).mean():.4f} ({time.time() - t0:.0f} s)")
    robust = np.concatenate(robust)
    adv = np.concatenate(adv)
    in_threat_model = self._in_threat_model(spec)
    if in_threat_model:
      for pos in np.nonzero(~robust)[0]:
        self.adversarial.setdefault(int(pos), adv[pos])
    record = robustness.accuracy_record(robust, attack=spec.name, kind=spec.kind, **spec.kw,
                                        wall_time_s=(sum(compute_s) if None not in compute_s
                                                     else None),
                                        this_run_s=time.time() - t0,
                                        cached_chunks=cached_chunks,
                                        computed_on=sorted(where))
    if stages:
      record.update(_autoattack_stages(stages))
    self.results[spec.name] = {"robust": robust, "record": record,
                               "in_threat_model": in_threat_model}
    return record

  # ---------------------------------------------------------------- verdict
  def _in_threat_model(self, spec: AttackSpec) -> bool:
    eps = spec.kw.get("eps")
    return self.eps is None or eps is None or abs(float(eps) - float(self.eps)) <= 1e-9

  def worst_case(self) -> dict:
    """Per-example minimum over every attack run at the suite's eps."""
    robust = np.ones(len(self.indices), bool)
    over = []
    for name, r in self.results.items():
      if r.get("in_threat_model", True):
        robust &= r["robust"]
        over.append(name)
    return robustness.accuracy_record(robust, attack="worst-case", over=sorted(over))

  def verify(self, eps: float, norm: str = "linf") -> dict:
    """Re-checks every stored adversarial: finite, in the ball and [0, 1], misclassified
    by a separate fp32 eval-mode forward pass. Returns counts of failures."""
    positions = sorted(self.adversarial)
    out = {"checked": len(positions), "nonfinite": 0, "outside_ball": 0, "outside_box": 0,
           "not_misclassified": 0}
    if not positions:
      return out
    for s in range(0, len(positions), self.batch_size):
      pos = np.array(positions[s:s + self.batch_size])
      clean = data_lib.read_batch(self.source, self.indices[pos])
      x0 = clean["image"].astype(np.float32) / 255.0
      adv = np.stack([self.adversarial[int(p)] for p in pos]).astype(np.float32)
      delta = (adv - x0).reshape(len(pos), -1)
      size = np.abs(delta).max(1) if norm == "linf" else np.linalg.norm(delta, axis=1)
      # A clean-misclassified point stores its clean image: nothing to verify there.
      pred = np.asarray(jax.jit(lambda f, x: jnp.argmax(f(x), -1))(self.logits_fn, jnp.asarray(adv)))
      out["nonfinite"] += int((~np.isfinite(adv)).reshape(len(pos), -1).any(1).sum())
      out["outside_ball"] += int((size > eps + 1e-5).sum())
      out["outside_box"] += int(((adv < 0) | (adv > 1)).reshape(len(pos), -1).any(1).sum())
      out["not_misclassified"] += int((pred == clean["label"]).sum())
    return out


def run_suite(logits_fn, source, specs: list[AttackSpec], *, eps: float, norm: str = "linf",
              sweep_steps: int | None = None, meta: dict | None = None,
              checks_cfg: dict | None = None, **suite_kwargs) -> dict:
  """Runs ``specs`` and the automatic checks; returns the report dict.

  ``sweep_steps``: the PGD step count whose records at several eps form the eps sweep.
  ``meta``: extra fields stored in the report (dataset, model, step, ...).
  """
  from agad.evaluation import checks
  suite = Suite(logits_fn, source, eps=eps, **suite_kwargs)
  t0 = time.time()
  records = [suite.run(spec) for spec in specs]
  verification = suite.verify(eps, norm)
  report = {
      "n": int(len(suite.indices)), "eps": eps, "norm": norm, "model_hash": suite.model_hash,
      "records": records, "worst_case": suite.worst_case(), "verification": verification,
      "wall_time_s": time.time() - t0, "sweep_steps": sweep_steps, "computed_here": suite.where,
      **(meta or {}),
  }
  report["warnings"] = checks.report_warnings(report, **(checks_cfg or {}))
  report["warnings"] += checks.model_checks(suite.logits_fn, source, suite.indices[:min(len(suite.indices), 200)],
                                            seed=suite.seed)
  return report
