"""The robustness suite: many attacks, one per-example worst case, cached and checked.

``run_suite(logits_fn, source, specs, ...)`` runs each ``AttackSpec`` on the same
examples, records per-example robustness (correct clean *and* after the attack),
re-verifies every row's stored adversarials (``agad.evaluation.verification``: a
separate forward pass of ``verify_logits_fn``, float32 where the caller has one, and
the row's eps with AutoAttack's 1e-6 slack) and counts a point as broken only by a
verified adversarial; it returns a report with one record per attack (settings, n,
verified accuracy, standard error, wall time, AutoAttack's own flags), the worst case
over everything run at the report's eps, and the checks of ``agad.evaluation.checks``.

Per-example attack results are cached in ``cache_dir`` under ``sha256(ATTACK_CODE_VERSION,
params hash, model/config fingerprint, dtype, stochastic, attack spec, seed, example
indices of the chunk)``: a later run adds attacks without redoing old ones, a long run
resumes chunk by chunk (AutoAttack within a chunk batch by batch, from its progress file
beside the entry), and changed attack code, weights, model definition, dtype, data or
setting never reuse stale results. Verification is never cached: it reruns each time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Mapping
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from agad import data as data_lib
from agad import sharding as sharding_lib
from agad.attacks import ATTACK_CODE_VERSION
from agad.checkpoint import params_hash  # noqa: F401  (re-exported: agad.evaluation.params_hash)
from agad.attacks import driver as driver_lib
from agad.evaluation import attack_kinds, checks, robustness, verification
from agad.objectives.base import adaptive_variants


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """One row of the report. ``kind`` picks the runner; ``settings`` are its arguments.

  kinds: clean, fgsm, pgd (loss ce|margin|dlr..., restarts), mim (momentum), cw (PGD on the
  kappa-clipped margin), adaptive (PGD on the defense's adaptive loss), transfer (PGD on
  a surrogate, evaluated on the target), square, apgd-ce, autoattack (version, and
  optionally steps, square_queries, attacks).
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


# Attack kinds whose randomness is drawn per example from ``fold_in(key, example index)``,
# so a row's verdicts do not depend on the batch size, the chunk size or the device count.
PER_EXAMPLE_KEY_KINDS = ("pgd", "cw", "fgsm", "adaptive", "transfer")
_PADDING_INDEX = 2**31 - 2**20


@jax.jit
def _example_keys(key, index):
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, index.astype(jnp.uint32))


def cache_key(
  model_hash: str,
  spec: AttackSpec,
  indices: np.ndarray,
  seed: int,
  *,
  fingerprint: str = "",
  dtype: str = "float32",
  stochastic: bool = False,
  version: int = ATTACK_CODE_VERSION,
) -> str:
  """The cache entry of one chunk: everything that determines its per-example result."""
  payload = json.dumps(
    {
      "model": model_hash,
      "fingerprint": fingerprint,
      "dtype": str(dtype),
      "stochastic": bool(stochastic),
      "attack_code": version,
      "name": spec.name,
      "kind": spec.kind,
      "settings": spec.kw,
      "seed": seed,
    },
    sort_keys=True,
    default=str,
  )
  h = hashlib.sha256(payload.encode())
  h.update(np.asarray(indices, np.int64).tobytes())
  return h.hexdigest()[:32]


@jax.jit
def _predict(logits_fn, images):
  return jnp.argmax(logits_fn(images), -1)


@jax.jit
def _predict_stochastic(logits_fn, images, key):
  return jnp.argmax(logits_fn(images, key), -1)


def compute_where() -> str:
  """The backend, device and matmul precision computing now (stored with each cache entry:
  a GPU's TF32 can flip a near-tie example against a CPU's float32)."""
  precision = jax.config.jax_default_matmul_precision or "default"
  return f"{jax.default_backend()}: {jax.devices()[0].device_kind}, {precision} matmul precision"


class Suite:
  """Runs specs on a fixed example set with caching and re-verification; see module docstring.

  Args:
    logits_fn: ``x [B,H,W,C] in [0,1] -> logits [B,K]`` of the attacked model (``(x, key)``
      if ``stochastic``).
    source: the examples (``agad.data`` random-access source, uint8 images).
    indices: positions in ``source`` to evaluate (default: all).
    cache_dir / model_hash / fingerprint / dtype: the cache and its key (``params_hash``
      of the weights; a caller's string naming the model definition and data, e.g. a
      hash of name, plug-ins, norm, dtype and dataset; the compute dtype).
    verify_logits_fn: the forward pass that re-verifies stored adversarials (default
      ``logits_fn``); pass a float32 one when the model computes in a lower precision.
    stochastic: the model is randomised: attacks draw a fresh key per step and
      AutoAttack ``rand`` runs EOT (on a deterministic model ``rand`` runs ``standard``).
    eps: the threat model of the verdict: only attacks at this eps enter the worst case
      (sweeps at other radii are reported, never combined).
  """

  def __init__(
    self,
    logits_fn,
    source,
    *,
    indices=None,
    batch_size: int = 500,
    seed: int = 0,
    cache_dir: str | None = None,
    model_hash: str | None = None,
    fingerprint: str = "",
    dtype: str = "float32",
    adaptive_loss: Callable | Mapping | None = None,
    surrogate=None,
    chunk: int = 1000,
    log: Callable | None = print,
    mesh=None,
    eps: float | None = None,
    verify_logits_fn: Callable | None = None,
    stochastic: bool = False,
  ):
    self.logits_fn = driver_lib.as_partial(logits_fn)
    self.verify_logits_fn = (
      self.logits_fn if verify_logits_fn is None else driver_lib.as_partial(verify_logits_fn)
    )
    self.dtype, self.fingerprint, self.stochastic = (
      str(dtype),
      str(fingerprint or ""),
      bool(stochastic),
    )
    self.verified_with = (
      "a separate float32 forward pass"
      if verify_logits_fn is not None or self.dtype == "float32"
      else f"a separate forward pass in the model's own {self.dtype} "
      "(no float32 verify_logits_fn given)"
    )
    self.source = source
    self.indices = np.arange(len(source)) if indices is None else np.asarray(indices)
    self.batch_size, self.seed, self.chunk = batch_size, seed, max(chunk, batch_size)
    self.cache_dir = cache_dir
    self.model_hash = model_hash or "unhashed"
    self.adaptive_loss, self.surrogate = adaptive_variants(adaptive_loss), surrogate
    self.log = log or (lambda *_: None)
    self.mesh = mesh or sharding_lib.make_mesh()
    self.data_sharding = sharding_lib.data_sharded(self.mesh)
    self.eps = eps
    self.where = compute_where()
    self.results: dict[str, dict] = {}
    # Position in indices -> the first verified adversarial at the suite's eps.
    self.adversarial: dict[int, np.ndarray] = {}

  # ---------------------------------------------------------------- caching
  def _cache_path(self, spec, chunk_indices) -> str | None:
    if not self.cache_dir:
      return None
    os.makedirs(self.cache_dir, exist_ok=True)
    key = cache_key(
      self.model_hash,
      spec,
      chunk_indices,
      self.seed,
      fingerprint=self.fingerprint,
      dtype=self.dtype,
      stochastic=self.stochastic,
    )
    return os.path.join(self.cache_dir, key + ".npz")

  # ---------------------------------------------------------------- running
  def _predict(self, x, key):
    if self.stochastic:
      return data_lib.to_host(_predict_stochastic(self.logits_fn, x, key))
    return data_lib.to_host(_predict(self.logits_fn, x))

  def _run_chunk_batched(self, spec, chunk_indices, key) -> tuple[np.ndarray, np.ndarray]:
    """Per-example robust [n], and the adversarial images (clean where not broken)."""
    runner = (
      None
      if spec.kind == "clean"
      else attack_kinds.batch_runner(
        spec,
        self.logits_fn,
        adaptive_loss=self.adaptive_loss,
        surrogate=self.surrogate,
        stochastic=self.stochastic,
      )
    )
    restarts = spec.kw.get("restarts", 1)
    robust_all, adv_all = [], []
    batches = data_lib.eval_batches(
      self.source,
      batch_size=self.batch_size,
      multiple_of=self.mesh.devices.size,
      indices=chunk_indices,
      full_batches=True,
    )
    per_example = spec.kind in PER_EXAMPLE_KEY_KINDS and not self.stochastic
    offset = 0
    for b, batch in enumerate(batches):
      mask = batch.pop("mask").astype(bool)
      # Every host holds the whole batch (and gets whole results): the mesh spans the hosts.
      x = data_lib.shard_batch(batch["image"], self.data_sharding, whole=True)
      y = data_lib.shard_batch(batch["label"], self.data_sharding, whole=True)
      labels = batch["label"]
      # The evaluated examples' own indices (padding rows get indices no example has).
      index = np.arange(len(mask), dtype=np.int64) + _PADDING_INDEX
      index[mask] = np.asarray(chunk_indices)[offset : offset + int(mask.sum())]
      offset += int(mask.sum())
      bkey = jax.random.fold_in(key, b)
      robust = self._predict(x, jax.random.fold_in(bkey, 1_000_003)) == labels
      best = np.array(batch["image"])
      for r in range(restarts if runner else 0):
        rkey = jax.random.fold_in(bkey, r)
        # fold_in(seed/restart key, example index): batch-, chunk- and device-independent.
        attack_key = (
          _example_keys(jax.random.fold_in(jax.random.key(self.seed), r), index)
          if per_example
          else rkey
        )
        adv = runner(x, y, attack_key)
        ok = self._predict(adv, jax.random.fold_in(rkey, 1)) == labels
        newly = robust & ~ok
        best[newly] = data_lib.to_host(adv)[newly]
        robust &= ok
      robust_all.append(robust[mask])
      adv_all.append(best[mask])
    return np.concatenate(robust_all), np.concatenate(adv_all)

  def _run_chunk_autoattack(self, spec, chunk_indices, key, path):
    batch = data_lib.read_batch(self.source, chunk_indices)
    images = batch["image"].astype(np.float32) / np.float32(255)
    return attack_kinds.run_autoattack(
      spec,
      self.logits_fn,
      images,
      batch["label"],
      key,
      batch_size=self.batch_size,
      stochastic=self.stochastic,
      # Beside the chunk's cache entry: an interrupted AutoAttack goes on batch by batch.
      resume_path=path[: -len(".npz")] + ".autoattack_progress.npz" if path else None,
    )

  def _load(self, path, spec):
    with np.load(path) as f:
      r, a = f["robust"], f["adversarial"]
      wall = float(f["wall_s"]) if "wall_s" in f else None
      where = str(f["computed_on"]) if "computed_on" in f else "unrecorded"
      stages = None
      if spec.kind == "autoattack" and "stages" in f:  # Older entries lack stages.
        stages = {**json.loads(str(f["stages"])), "broken_by": f["broken_by"]}
    return r, a, wall, where, stages

  def _compute(self, spec, chunk_indices, c, path):
    key = jax.random.fold_in(jax.random.key(self.seed), c)
    t0 = time.time()
    stages, extra = None, {}
    if spec.kind == "autoattack":
      r, a, stages = self._run_chunk_autoattack(spec, chunk_indices, key, path)
      t0 -= stages["earlier_s"]  # the chunk's wall time includes the interrupted runs
      extra = {
        "broken_by": stages["broken_by"],
        "stages": json.dumps({k: stages[k] for k in ("order", "times", "flags", "version_run")}),
      }
    else:
      r, a = self._run_chunk_batched(spec, chunk_indices, key)
    wall = time.time() - t0
    if path and jax.process_index() == 0:  # every host computed it; one writes
      tmp = path + ".tmp.npz"
      np.savez(tmp, robust=r, adversarial=a, wall_s=wall, computed_on=self.where, **extra)
      os.replace(tmp, path)
    return r, a, wall, self.where, stages

  def run(self, spec: AttackSpec) -> dict:
    """Runs (or loads from cache) one attack on all examples, re-verifies its stored
    adversarials, and returns its record (accuracy counts verified breaks only)."""
    t0 = time.time()
    robust, adv, cached_chunks, stages, starts = [], [], 0, [], []
    compute_s: list[float | None] = []  # per chunk: seconds it took when computed
    where: set[str] = set()  # per chunk: where it was computed
    for c, start in enumerate(range(0, len(self.indices), self.chunk)):
      chunk_indices = self.indices[start : start + self.chunk]
      path = self._cache_path(spec, chunk_indices)
      if path and os.path.exists(path):
        r, a, wall, at, chunk_stages = self._load(path, spec)
        cached_chunks += 1
      else:
        r, a, wall, at, chunk_stages = self._compute(spec, chunk_indices, c, path)
      robust.append(r)
      adv.append(a)
      compute_s.append(wall)
      where.add(at)
      stages.append(chunk_stages)
      starts.append(start)
      done = start + len(chunk_indices)
      self.log(
        f"  {spec.name}: {done}/{len(self.indices)} accuracy so far "
        f"{np.concatenate(robust).mean():.4f} ({time.time() - t0:.0f} s)"
      )
    claimed = np.concatenate(robust)
    adv = np.concatenate(adv)
    robust, failures, verified = self._verify_row(spec, claimed, adv)
    in_threat_model = self._in_threat_model(spec)
    if in_threat_model:
      for pos in verified:
        self.adversarial.setdefault(int(pos), adv[pos])
    record = robustness.accuracy_record(
      robust,
      attack=spec.name,
      kind=spec.kind,
      **spec.kw,
      wall_time_s=(sum(compute_s) if None not in compute_s else None),
      this_run_s=time.time() - t0,
      cached_chunks=cached_chunks,
      computed_on=sorted(where),
    )
    record["unverified"] = failures["checked"] - len(verified)
    if record["unverified"]:
      record["claimed_accuracy"] = float(claimed.mean())
      record["verification_failures"] = {k: v for k, v in failures.items() if k != "checked" and v}
    if spec.kind == "autoattack":
      record.update(attack_kinds.autoattack_stages(stages, starts))
    self.results[spec.name] = {
      "robust": robust,
      "record": record,
      "verification": failures,
      "in_threat_model": in_threat_model,
    }
    return record

  def _verify_row(self, spec, claimed, adv):
    """``(robust [n] after verification, failure counts, verified broken positions)``."""
    pos = np.nonzero(~claimed)[0]
    if not len(pos):
      return claimed, {"checked": 0, **{k: 0 for k in verification.FAILURES}}, pos
    clean = data_lib.read_batch(self.source, self.indices[pos])
    masks = verification.check(
      self.verify_logits_fn,
      clean["image"].astype(np.float32) / np.float32(255),
      adv[pos],
      clean["label"],
      eps=spec.kw.get("eps"),
      norm=spec.kw.get("norm", "linf"),
      key=jax.random.key(self.seed),
      stochastic=self.stochastic,
      batch_size=self.batch_size,
    )
    robust = claimed.copy()
    robust[pos[~masks["ok"]]] = True
    return robust, verification.counts(masks), pos[masks["ok"]]

  # ---------------------------------------------------------------- verdict
  def _in_threat_model(self, spec: AttackSpec) -> bool:
    eps = spec.kw.get("eps")
    return self.eps is None or eps is None or abs(float(eps) - float(self.eps)) <= 1e-9

  def worst_case_robust(self) -> tuple[np.ndarray, list[str]]:
    """Per-example minimum over every attack run at the suite's eps (verified breaks)."""
    robust = np.ones(len(self.indices), bool)
    over = []
    for name, r in self.results.items():
      if r.get("in_threat_model", True):
        robust &= r["robust"]
        over.append(name)
    return robust, sorted(over)

  def worst_case(self) -> dict:
    robust, over = self.worst_case_robust()
    return robustness.accuracy_record(robust, attack="worst-case", over=over)

  def per_example(self) -> dict:
    """Arrays for paired comparisons (``agad.evaluation.compare``): ``indices`` [n],
    ``worst_case`` [n] and ``row/<name>`` [n] (robust after verification)."""
    return {
      "indices": np.asarray(self.indices, np.int64),
      "worst_case": self.worst_case_robust()[0],
      **{f"row/{name}": np.asarray(r["robust"], bool) for name, r in self.results.items()},
    }

  def verify(self, eps: float, norm: str = "linf") -> dict:
    """Re-checks the stored worst-case adversarials (``self.adversarial``) with
    ``verify_logits_fn`` at ``eps`` (1e-6 slack): counts of failures of each kind."""
    positions = np.array(sorted(self.adversarial), np.int64)
    if not len(positions):
      return {"checked": 0, **{k: 0 for k in verification.FAILURES}}
    clean = data_lib.read_batch(self.source, self.indices[positions])
    adv = np.stack([self.adversarial[int(p)] for p in positions])
    masks = verification.check(
      self.verify_logits_fn,
      clean["image"].astype(np.float32) / np.float32(255),
      adv,
      clean["label"],
      eps=eps,
      norm=norm,
      key=jax.random.key(self.seed),
      stochastic=self.stochastic,
      batch_size=self.batch_size,
    )
    return verification.counts(masks)


def run_suite(
  logits_fn,
  source,
  specs: list[AttackSpec],
  *,
  eps: float,
  norm: str = "linf",
  sweep_steps: int | None = None,
  meta: dict | None = None,
  checks_cfg: dict | None = None,
  dtype: str = "float32",
  verify_logits_fn: Callable | None = None,
  stochastic: bool = False,
  fingerprint: str = "",
  **suite_kwargs,
) -> dict:
  """Runs ``specs`` and the automatic checks; returns the report dict (its ``per_example``
  holds numpy arrays, :meth:`Suite.per_example`; ``checkpoint_eval.evaluate`` writes them to an .npz).

  Args:
    eps, norm: the report's threat model.
    sweep_steps: the PGD step count whose records at several eps form the eps sweep.
    meta: extra fields stored in the report (dataset, model, step, ...); they cannot
      override the fields measured here.
    dtype: the compute dtype of ``logits_fn`` (reported, and part of the cache key).
    verify_logits_fn: a float32 forward pass of the same model for re-verification
      (default: ``logits_fn`` itself; the report says which was used).
    stochastic: ``logits_fn(x, key)`` is randomised (see ``Suite``).
    fingerprint: the model/config identity for the cache key (see ``Suite``).
    suite_kwargs: the rest of ``Suite``'s arguments.
  """
  suite = Suite(
    logits_fn,
    source,
    eps=eps,
    dtype=dtype,
    verify_logits_fn=verify_logits_fn,
    stochastic=stochastic,
    fingerprint=fingerprint,
    **suite_kwargs,
  )
  t0 = time.time()
  records = [suite.run(spec) for spec in specs]
  verified = suite.verify(eps, norm)
  verified["rows"] = {name: r["verification"] for name, r in suite.results.items()}
  verified["with"], verified["slack"] = suite.verified_with, verification.SLACK
  report = {
    **(meta or {}),
    "n": int(len(suite.indices)),
    "eps": eps,
    "norm": norm,
    "model_hash": suite.model_hash,
    "fingerprint": suite.fingerprint,
    "dtype": suite.dtype,
    "stochastic": suite.stochastic,
    "attack_code_version": ATTACK_CODE_VERSION,
    "records": records,
    "worst_case": suite.worst_case(),
    "verification": verified,
    "wall_time_s": time.time() - t0,
    "sweep_steps": sweep_steps,
    "computed_here": suite.where,
    "per_example": suite.per_example(),
  }
  report["warnings"] = checks.report_warnings(report, **(checks_cfg or {}))
  report["not_applicable"] = checks.not_applicable(report)
  report["warnings"] += checks.model_checks(
    suite.logits_fn,
    source,
    suite.indices[: min(len(suite.indices), 200)],
    seed=suite.seed,
    stochastic=suite.stochastic,
  )
  if "own" in suite.verified_with:
    report["warnings"].append(
      f"stored adversarials were re-verified in {suite.dtype}, not float32: "
      "pass verify_logits_fn (a float32 forward pass)"
    )
  return report
