"""AutoAttack (Croce & Hein, ICML 2020) in JAX: a per-example worst case over an ensemble.

``version="standard"`` (L-inf and L2, same settings for both, as the reference):
APGD-CE (100 iterations, 1 restart) -> APGD-T (targeted DLR, 9 targets x 100 iterations)
-> FAB-T (9 targets x 100 iterations) -> Square (5000 queries, p_init 0.8, no schedule
rescaling). ``"plus"``: APGD-CE and APGD-DLR with 5
restarts, FAB with 5 restarts, Square, APGD-T, FAB-T. ``"rand"`` (for randomised models,
``logits_fn(x, key)`` with ``stochastic=True``): APGD-CE and APGD-DLR with EOT over 20
draws. Constants are those of fra31/auto-attack (``autoattack.py``, ``set_version``).

Each attack runs only on the points still robust and starts from the clean image. A
point becomes non-robust only when its candidate, re-classified by a separate forward
pass, is misclassified, finite, inside the eps-ball (1e-6 slack for float rounding) and
inside [0, 1]; its adversarial is then stored. Points never broken keep the clean image.

The shrinking robust set is processed in batches of at most ``batch_size`` rows padded
(with copies of a real row, masked out) to a bucket size: ``batch_size`` or one of four
sizes per power of two below it (down to ``min_bucket``; ``agad.attacks.batching``
``bucket_sizes`` and ``padded_batches``). Every attack therefore compiles at most once
per bucket size, and repeated evaluations reuse the compiled programs.

Random numbers are per example: every attack of stage s, round r (APGD-T / FAB-T
target) draws example i's randomness from ``fold_in(fold_in(fold_in(key, s), r), i)``
with i the example's index in ``images``. On a deterministic model the same key gives
the same per-example result whatever ``batch_size``, ``min_bucket`` or the number of
images evaluated with it (bitwise on CPU, where XLA's per-row arithmetic does not
depend on the batch size; randomised models draw their noise per batch).
"""

from __future__ import annotations

import collections
import functools
import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from agad.attacks import driver as driver_lib
from agad.attacks.apgd import apgd_attack
from agad.attacks.autoattack_progress import Position, Progress, run_identity
from agad.attacks.dlr import ranked_targets
from agad.attacks.fab import fab_attack
from agad.attacks.batching import bucket_sizes, call_logits, lp_norm, padded_batches
from agad.attacks.square import square_attack


def _log(message: str) -> None:
  """A progress line, flushed so that it shows at once in logs redirected to a file."""
  print(message, flush=True)


# Within Square's one long round (5,000 queries), a progress line at most this often.
PROGRESS_SECONDS = 60.0


VERSIONS = ("standard", "plus", "rand", "custom")
ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
NORMS = ("linf", "l2")
_NORM_SLACK = 1e-6


@functools.partial(jax.jit, static_argnums=(3,))
def _predict(logits_fn, x, key, stochastic: bool):
  return call_logits(logits_fn, x, key, stochastic).astype(jnp.float32)


@jax.jit
def _index_keys(key: jax.Array, indices: jax.Array) -> jax.Array:
  """``[B]`` keys ``fold_in(key, i)`` for the examples' indices ``[B]``."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)


@functools.partial(jax.jit, static_argnums=(6, 7))
def _verify(logits_fn, x0, x_adv, labels, eps, key, stochastic: bool, norm: str):
  """Separate forward pass: misclassified, finite, inside the eps-ball and [0, 1]."""
  logits = call_logits(logits_fn, x_adv, key, stochastic)
  flat = x_adv.reshape(x_adv.shape[0], -1)
  finite = jnp.all(jnp.isfinite(flat), axis=-1)
  in_box = jnp.all((flat >= 0.0) & (flat <= 1.0), axis=-1)
  in_ball = lp_norm(x_adv - x0, norm) <= eps + _NORM_SLACK
  wrong = jnp.argmax(logits, axis=-1) != labels
  return wrong & finite & in_box & in_ball, jnp.argmax(logits, axis=-1)


# The versions' stages (fra31/auto-attack ``set_version``): attack names in order and the
# restarts of the untargeted attacks. ``"custom"`` takes its names from ``attacks=``.
STAGES = {
  "standard": (("apgd-ce", "apgd-t", "fab-t", "square"), 1),
  "plus": (("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"), 5),
  "rand": (("apgd-ce", "apgd-dlr"), 1),
}
# The fewest classes an attack can run with (fewer: skipped with a flag saying why).
_MIN_CLASSES = {"apgd-dlr": (3, "DLR"), "apgd-t": (4, "targeted DLR")}


def _stage_names(version: str, attacks: Sequence[str] | None) -> tuple[list[str], int]:
  """``(attack names, restarts)`` of ``version``, after checking ``attacks=``."""
  if version == "custom":
    if not attacks:
      raise ValueError(f"version='custom' needs attacks=, a list from {ATTACKS}")
    names, restarts = list(attacks), 1
  elif version in STAGES:
    names, restarts = list(STAGES[version][0]), STAGES[version][1]
  else:
    raise ValueError(f"version {version!r} is not one of {VERSIONS}")
  if attacks is not None and version != "custom":
    raise ValueError("attacks= is only used with version='custom'")
  unknown = [a for a in names if a not in ATTACKS]
  if unknown:
    raise ValueError(f"unknown attacks {unknown}; choose from {ATTACKS}")
  return names, restarts


def _settings(
  name: str,
  *,
  version: str,
  restarts: int,
  steps: int,
  square_queries: int,
  eot_iter: int,
  n_targets: int,
  stochastic: bool,
) -> dict:
  """The settings of one stage's attack."""
  if name in ("apgd-ce", "apgd-dlr"):
    eot = eot_iter if version == "rand" or (version == "custom" and stochastic) else 1
    return dict(loss=name[5:], steps=steps, restarts=restarts, eot_iter=eot)
  if name == "apgd-t":
    return dict(loss="dlr-targeted", steps=steps, restarts=1, eot_iter=1, n_targets=n_targets)
  if name == "fab":
    return dict(steps=steps, restarts=restarts, targeted=False)
  if name == "fab-t":
    return dict(steps=steps, restarts=1, targeted=True, n_targets=n_targets)
  return dict(n_queries=square_queries, p_init=0.8, restarts=1)


def _plan(
  version: str,
  attacks: Sequence[str] | None,
  norm: str,
  steps: int,
  square_queries: int,
  eot_iter: int,
  num_classes: int,
  n_target_classes: int,
  stochastic: bool,
) -> tuple[list[tuple[str, dict]], list[str]]:
  """``[(attack name, settings)]`` for a version, plus warnings about skipped attacks."""
  flags = []
  names, restarts = _stage_names(version, attacks)
  if norm not in NORMS:
    raise ValueError(f"norm {norm!r} is not one of {NORMS}")
  n_targets = min(n_target_classes, num_classes - 1)
  if n_targets < n_target_classes and any(a in ("apgd-t", "fab-t") for a in names):
    flags.append(
      f"only {num_classes} classes: targeted attacks use {n_targets} targets, "
      f"not {n_target_classes}"
    )
  plan = []
  for name in names:
    if name in _MIN_CLASSES and num_classes < _MIN_CLASSES[name][0]:
      least, what = _MIN_CLASSES[name]
      flags.append(f"{name} skipped: {what} needs >= {least} classes, the model has {num_classes}")
      continue
    plan.append(
      (
        name,
        _settings(
          name,
          version=version,
          restarts=restarts,
          steps=steps,
          square_queries=square_queries,
          eot_iter=eot_iter,
          n_targets=n_targets,
          stochastic=stochastic,
        ),
      )
    )
  return plan, flags


def _check_inputs(images, labels, eps) -> tuple[np.ndarray, np.ndarray]:
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels).astype(np.int32)
  if images.ndim != 4:
    raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
  if labels.shape != images.shape[:1]:
    raise ValueError(f"labels shape {labels.shape} does not match N={images.shape[0]}")
  if images.size and (images.min() < 0.0 or images.max() > 1.0):
    raise ValueError("images must lie in [0, 1]; normalise inside the model, not outside")
  if np.ndim(eps) != 0 or not eps >= 0:
    raise ValueError(f"eps must be a scalar >= 0, got {eps!r}")
  return images, labels


class _Run:
  """What the stages share: the inputs, their settings, and the per-example results so far
  (``robust``, ``adversarial``, ``adv_pred``, ``broken_by``, ``zero_grad``)."""

  def __init__(
    self,
    logits_fn,
    images,
    labels,
    key,
    *,
    eps,
    norm,
    batch_size,
    min_bucket,
    stochastic,
    driver,
    chunk,
    square_chunk,
    verbose,
  ):
    self.logits_fn, self.images, self.labels, self.key = logits_fn, images, labels, key
    self.eps, self.eps32, self.norm = eps, jnp.float32(eps), norm
    self.batch_size, self.stochastic, self.verbose = batch_size, stochastic, verbose
    self.driver, self.chunk, self.square_chunk = driver, chunk, square_chunk
    self.n = images.shape[0]
    self.batches = functools.partial(
      padded_batches, batch_size=batch_size, sizes=bucket_sizes(batch_size, min_bucket)
    )
    self.zero_grad = np.zeros(
      (self.n,), bool
    )  # points with an exactly zero gradient in some APGD run

  def clean_pass(self) -> np.ndarray:
    """The clean logits ``[N, K]``; sets the results to the clean predictions."""
    n = self.n
    clean_logits = np.zeros((n, 0), np.float32)
    if n:
      parts = []
      for start, real, padded, _ in self.batches(np.arange(n)):
        out = _predict(
          self.logits_fn,
          jnp.asarray(self.images[padded]),
          jax.random.fold_in(self.key, 10_000 + start),
          self.stochastic,
        )
        parts.append(np.asarray(out)[: len(real)])
      clean_logits = np.concatenate(parts)
    self.robust = (clean_logits.argmax(-1) == self.labels) if n else np.zeros((0,), bool)
    self.broken_by = np.where(self.robust, "", "clean").astype(object)
    self.adversarial = self.images.copy()
    self.adv_pred = clean_logits.argmax(-1).astype(np.int32) if n else np.zeros((0,), np.int32)
    return clean_logits

  def attack(self, name: str, settings: dict, x, y, run_key, targets, valid_j, real, progress=None):
    """One attack on one padded batch: its candidate adversarials. ``progress``: Square's
    progress callback (``square_attack``)."""
    common = dict(
      eps=self.eps32, norm=self.norm, stochastic=self.stochastic, valid=valid_j, driver=self.driver
    )
    if name.startswith("apgd"):
      result = apgd_attack(
        self.logits_fn,
        x,
        y,
        run_key,
        steps=settings["steps"],
        loss=settings["loss"],
        restarts=settings["restarts"],
        targets=targets if name == "apgd-t" else None,
        eot_iter=settings["eot_iter"],
        chunk=self.chunk,
        **common,
      )
      self.zero_grad[real[np.asarray(result.zero_grad)[: len(real)]]] = True
    elif name.startswith("fab"):
      result = fab_attack(
        self.logits_fn,
        x,
        y,
        run_key,
        steps=settings["steps"],
        targeted=settings["targeted"],
        targets=targets if settings["targeted"] else None,
        restarts=settings["restarts"],
        stop_when_within_eps=True,
        chunk=self.chunk or 10,
        **common,
      )
    else:
      result = square_attack(
        self.logits_fn,
        x,
        y,
        run_key,
        n_queries=settings["n_queries"],
        p_init=settings["p_init"],
        restarts=settings["restarts"],
        chunk=self.square_chunk,
        progress=progress,
        **common,
      )
    return result.adversarial

  def square_progress(self, name: str, batch: int, n_batches: int, stage_start: float):
    """A callback for ``square_attack`` that logs a line at most every PROGRESS_SECONDS."""
    if not self.verbose:
      return None
    last = [time.time()]

    def report(queries: int, total: int, robust: int) -> None:
      now = time.time()
      if now - last[0] < PROGRESS_SECONDS:
        return
      last[0] = now
      _log(
        f"[autoattack]   {name} batch {batch}/{n_batches}: {queries}/{total} queries, "
        f"{robust} points of the batch still robust ({now - stage_start:.0f} s into the stage)"
      )

    return report

  def stage(self, stage: int, name: str, settings: dict, ranked, position=None, save=None) -> float:
    """Stage ``stage``: ``name`` on the points still robust, round by round (targets);
    returns the seconds spent in the stage (those before an interruption included).

    ``position``: a saved ``Position`` inside this stage to go on from (its round's
    points and the batches of it already run); ``save(position)`` is called after every
    batch with the position that follows it.
    """
    elapsed = position.stage_s if position else 0.0
    stage_start = time.time() - elapsed
    n_rounds = settings.get("n_targets", 1)
    first_round = position.round if position else 0
    for round_index in range(first_round, n_rounds):
      # A position after a stage's end (round 0, no batch done) starts the stage afresh.
      resumed = position is not None and position.batches_done and round_index == first_round
      indices = position.indices if resumed else np.nonzero(self.robust)[0]
      if len(indices) == 0:
        break
      round_key = jax.random.fold_in(jax.random.fold_in(self.key, stage), round_index)
      batches = list(self.batches(indices))
      for batch, (start, real, padded, valid) in enumerate(batches, 1):
        if resumed and batch <= position.batches_done:
          continue
        x, y = jnp.asarray(self.images[padded]), jnp.asarray(self.labels[padded])
        # Per-example keys from the example's index in the evaluated set: a result does
        # not depend on the batch size, the bucket or the other examples of its batch.
        run_key = _index_keys(round_key, jnp.asarray(padded))
        batch_key = jax.random.fold_in(round_key, start)  # randomised models only
        targets = jnp.asarray(ranked[padded, round_index]) if ranked is not None else None
        progress = (
          self.square_progress(name, batch, len(batches), stage_start) if name == "square" else None
        )
        candidate = self.attack(
          name, settings, x, y, run_key, targets, jnp.asarray(valid), real, progress
        )
        ok, pred = _verify(
          self.logits_fn,
          x,
          candidate,
          y,
          self.eps32,
          jax.random.fold_in(batch_key, 1),
          self.stochastic,
          self.norm,
        )
        ok = np.asarray(ok)[: len(real)]
        broken = real[ok]
        self.robust[broken] = False
        self.adversarial[broken] = np.asarray(candidate)[: len(real)][ok]
        self.adv_pred[broken] = np.asarray(pred)[: len(real)][ok]
        self.broken_by[broken] = name
        if save is not None:
          save(Position(stage, round_index, indices, batch, time.time() - stage_start))
      if self.verbose and (n_rounds > 1 or len(indices) > self.batch_size):
        _log(
          f"[autoattack]   {name} round {round_index + 1}/{n_rounds}: "
          f"{len(indices)} points attacked, robust accuracy now {self.robust.mean():.2%} "
          f"({time.time() - stage_start:.0f} s into the stage)"
        )
    return time.time() - stage_start


def _clean_flags(clean_logits: np.ndarray, n: int, stochastic: bool, version: str) -> list[str]:
  flags = []
  if (
    n
    and np.all(clean_logits <= 1.0 + 1e-5)
    and np.all(clean_logits >= -1e-5)
    and np.all(np.abs(clean_logits.sum(-1) - 1.0) < 1e-5)
  ):
    flags.append("the outputs look like probabilities (softmax); pass logits")
  if stochastic and version != "rand":
    flags.append("stochastic model evaluated without EOT; consider version='rand'")
  return flags


def _final_flags(run: _Run, per_attack: dict) -> list[str]:
  """Warnings after the last stage: zero gradients, and Square beating the white-box attacks."""
  flags = []
  if run.zero_grad.any():
    flags.append(
      f"{int(run.zero_grad.sum())} points had an exactly zero input gradient at "
      "the APGD start: gradient masking? (try BPDA or rely on Square)"
    )
  names_run = list(per_attack)
  if len(names_run) > 1 and names_run[-1] == "square":
    white_box = per_attack[names_run[-2]]
    if per_attack["square"] < white_box - 0.002:
      flags.append(
        f"Square lowered robust accuracy by {white_box - per_attack['square']:.2%} "
        "after the white-box attacks: gradient masking?"
      )
  return flags


def _report(run: _Run, *, clean_accuracy, per_attack, times, flags, version, start_time) -> dict:
  """The per-example results and summary ``autoattack`` returns (logged if verbose)."""
  n, robust, adversarial, norm = run.n, run.robust, run.adversarial, run.norm
  if run.verbose:
    for flag in flags:
      _log(f"[autoattack] warning: {flag}")
    if n:
      delta = lp_norm(jnp.asarray(adversarial - run.images), norm)
      _log(
        f"[autoattack] max {norm} perturbation {float(delta.max()):.5f}, "
        f"nan {int(np.isnan(adversarial).sum())}, range [{adversarial.min():.3f}, "
        f"{adversarial.max():.3f}], robust accuracy {robust.mean():.2%}, "
        f"total {time.time() - start_time:.1f} s"
      )
  robust_accuracy = float(robust.mean()) if n else float("nan")
  return {
    "robust": robust,
    "adversarial": adversarial,
    "per_attack": per_attack,
    "clean_accuracy": clean_accuracy,
    "robust_accuracy": robust_accuracy,
    "std_error": math.sqrt(robust_accuracy * (1 - robust_accuracy) / n) if n else float("nan"),
    "broken_by": run.broken_by,
    "adversarial_predictions": run.adv_pred,
    "times": times,
    "flags": flags,
    "n": n,
    "eps": float(run.eps),
    "norm": norm,
    "version": version,
  }


def autoattack(
  logits_fn: Callable,
  images,
  labels,
  key: jax.Array,
  *,
  eps: float,
  norm: str = "linf",
  version: str = "standard",
  batch_size: int = 250,
  steps: int = 100,
  square_queries: int = 5000,
  n_target_classes: int = 9,
  attacks: Sequence[str] | None = None,
  stochastic: bool = False,
  eot_iter: int = 20,
  min_bucket: int = 8,
  verbose: bool = False,
  driver: str = "auto",
  chunk: int | None = None,
  square_chunk: int = 20,
  resume_path: str | None = None,
) -> dict[str, Any]:
  """Runs AutoAttack and returns per-example results. Stable public entry point.

  Args:
    logits_fn: ``images [B,H,W,C] float32 in [0,1] -> logits [B,K]`` of the deployed
      model (eval-mode BN, fp32); ``(images, key)`` if ``stochastic``. Pass a
      ``jax.tree_util.Partial`` (e.g. from ``agad.make_logits_fn``) to reuse compiles.
    images: ``[N, H, W, C]`` in [0, 1] (numpy or jax); labels: ``[N]`` int.
    key: PRNG key; eps: radius in [0, 1] pixel units (L-inf) or L2 units.
    norm: ``"linf"`` or ``"l2"`` (every attack and version supports both).
    version: ``"standard"``, ``"plus"``, ``"rand"`` or ``"custom"`` (with ``attacks``).
    batch_size: largest bucket; steps: APGD/FAB iterations; square_queries: Square budget.
    eot_iter: EOT draws per APGD step for ``version="rand"`` (and ``"custom"`` with
      ``stochastic``).
    n_target_classes: targets of APGD-T and FAB-T (capped at ``K - 1``).
    min_bucket: smallest bucket size; chunk / square_chunk: steps per compiled chunk
      (defaults: 10 for APGD and FAB, fewer with EOT; 20 queries for Square).
    resume_path: a file where the per-example results and the position are saved after
      every batch of every stage (atomically, by process 0). A run that finds the file goes
      on after the last batch it holds, with the results of an uninterrupted run (the
      per-example keys make them the same); the file must come from the same images,
      labels, key, settings and model (else ``ValueError``). Removed when the run ends.
  Returns:
    dict with ``robust`` ``[N]`` bool numpy, ``adversarial`` ``[N,H,W,C]`` float32 numpy
    (clean image where never broken), ``per_attack`` (ordered attack name -> robust
    accuracy after that attack), ``clean_accuracy``, ``robust_accuracy``, ``std_error``,
    ``broken_by`` ``[N]`` str (``"clean"``, an attack name, or ``""`` if robust),
    ``adversarial_predictions`` ``[N]``, ``times`` (seconds per attack, over every run
    of a resumed one), ``flags`` (warnings in the spirit of the reference's checks),
    ``n`` and ``resumed`` (``None``, or where a resumed run went on and the seconds spent
    before it).
  """
  images, labels = _check_inputs(images, labels, eps)
  start_time = time.time()
  run = _Run(
    driver_lib.as_partial(logits_fn),
    images,
    labels,
    key,
    eps=eps,
    norm=norm,
    batch_size=batch_size,
    min_bucket=min_bucket,
    stochastic=stochastic,
    driver=driver,
    chunk=chunk,
    square_chunk=square_chunk,
    verbose=verbose,
  )
  n = run.n
  # Clean pass.
  clean_logits = run.clean_pass()
  num_classes = clean_logits.shape[-1] if n else 0
  clean_accuracy = float(run.robust.mean()) if n else float("nan")
  flags = _clean_flags(clean_logits, n, stochastic, version)

  # Plan: the version's stages for this model.
  plan, plan_flags = (
    _plan(
      version,
      attacks,
      norm,
      steps,
      square_queries,
      eot_iter,
      max(num_classes, 2),
      n_target_classes,
      stochastic,
    )
    if n
    else ([], [])
  )
  flags += plan_flags
  if eps == 0:  # No attack can move a point: robust accuracy is clean accuracy.
    plan = []
    flags.append("eps = 0: no attack run (robust accuracy = clean accuracy)")
  ranked = (
    ranked_targets(jnp.asarray(clean_logits), max(1, min(n_target_classes, num_classes - 1)))
    if n and num_classes >= 2
    else None
  )
  ranked = np.asarray(ranked) if ranked is not None else None
  if verbose:
    _log(
      f"[autoattack] {version} ({', '.join(p[0] for p in plan)}), eps={eps:.5f}, "
      f"n={n}, clean accuracy {clean_accuracy:.2%}"
    )

  # Run: each stage on the points still robust, from where a saved run stopped.
  progress = (
    Progress(
      resume_path,
      run_identity(
        images,
        labels,
        key,
        eps=float(eps),
        norm=norm,
        version=version,
        plan=plan,
        stochastic=stochastic,
        batch_size=batch_size,
        min_bucket=min_bucket,
        n_target_classes=n_target_classes,
      ),
      run,
      clean_logits.argmax(-1) if n else np.zeros((0,), np.int64),
      [name for name, _ in plan],
      start_time,
    )
    if resume_path is not None
    else None
  )
  per_attack = progress.per_attack if progress else collections.OrderedDict()
  times = progress.times if progress else {}
  if progress:
    start_time = progress.start_time  # earlier by the seconds spent before a resumed run
  if progress and progress.resumed and verbose:
    _log(progress.describe())
  for stage, (name, settings) in enumerate(plan):
    here = progress.position_in(stage) if progress else None
    if here is False:
      continue  # done before the interruption: its results came from the file
    times[name] = run.stage(
      stage, name, settings, ranked, here, progress.save if progress else None
    )
    per_attack[name] = float(run.robust.mean())
    if progress:
      progress.save(Position(stage + 1))
    if verbose:
      _log(
        f"[autoattack] after {name}: robust accuracy {per_attack[name]:.2%} ({times[name]:.1f} s)"
      )

  # Report.
  flags += _final_flags(run, per_attack)
  if progress:
    progress.remove()
  report = _report(
    run,
    clean_accuracy=clean_accuracy,
    per_attack=per_attack,
    times=times,
    flags=flags,
    version=version,
    start_time=start_time,
  )
  return {**report, "resumed": progress.resumed if progress else None}
