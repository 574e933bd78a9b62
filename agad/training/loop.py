"""``train_and_evaluate(config, workdir)``: the whole training program.

Resumes from the newest intact checkpoint in ``workdir`` automatically (exactly: TrainState
and the input iterator state are restored together), refuses to resume when a
trajectory field of the config changed, validates on a split carved from train after
every epoch and keeps the best checkpoint by validation robust accuracy.

Stops, in one line that names what to do, when the run cannot go on: a non-finite training
loss or gradient norm (``NonFiniteError``: the step and the metric; checked for every step
at each log and before each save, so no checkpoint follows a bad step) or a workdir that
cannot be written (``checkpoint.WorkdirWriteError``: the path). Either way the last good
checkpoint stays restorable.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from agad import data as data_lib
from agad.training import builders
from agad import checkpoint as ckpt_lib
from agad.training import records
from agad import sharding
from agad.training import step as step_lib
from agad.training.state import TrainState, init_train_state

# Config fields that define the training trajectory: resuming with any of them
# changed would silently mix two different runs.
TRAJECTORY_FIELDS = (
  "seed",
  "batch_size",
  "num_epochs",
  "model",
  "objective",
  "attack",
  "data",
  "optim",
  "ema_decay",
  "init",
)


def trajectory(config: Any) -> dict:
  full = json.loads(config.to_json_best_effort())
  return {k: full.get(k) for k in TRAJECTORY_FIELDS}


def _flatten(d: Any, prefix: str = "") -> dict:
  if not isinstance(d, dict):
    return {prefix: d}
  out = {}
  for k, v in d.items():
    out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
  return out


# Fields added after runs were saved, with the value that reproduces those runs: a
# checkpoint without the field resumes under that value (anything else is a change).
ADDED_FIELDS = {"optim.grad_clip": 0.0}


def trajectory_diff(old: dict, new: dict) -> list[str]:
  a, b = _flatten(old), _flatten(new)
  a = {**{k: v for k, v in ADDED_FIELDS.items() if a and k.split(".")[0] in old}, **a}
  return [
    f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
    for k in sorted(set(a) | set(b))
    if a.get(k) != b.get(k)
  ]


class NonFiniteError(FloatingPointError):
  """Training diverged: a non-finite loss or gradient norm (the message names the step)."""


# Per-step metrics whose non-finite value means the run diverged (a NaN gradient makes the
# parameters NaN at once, a step before the loss shows it).
FINITE_METRICS = ("loss", "grad_norm")


# Validation clean accuracy at most this far above chance (1/K), from step CHANCE_MIN_STEPS
# on (before, a model may simply not have learnt yet: smoke runs), reads as a collapsed run.
CHANCE_MARGIN = 0.02
CHANCE_MIN_STEPS = 100


def chance_warning(val: dict, num_classes: int, lr: float, seed: int, step: int) -> str | None:
  """A warning when validation clean accuracy at ``step`` is at chance: the model has most
  likely collapsed to a (near) constant output, which training rarely leaves (the table
  recipe on some seed and CPU instruction set: docs/results/afa.md). ``None`` otherwise."""
  clean = val["val/clean_accuracy"]
  if step < CHANCE_MIN_STEPS or not val.get("val/n"):
    return None
  if clean > 1.0 / num_classes + CHANCE_MARGIN:
    return None
  return (
    f"validation clean accuracy {clean:.4f} is at chance (1/{num_classes} = "
    f"{1.0 / num_classes:.4f}): the model has most likely collapsed to a constant output "
    "and will not recover. Stop this run and train in a new --workdir with a lower "
    f"--config.optim.lr (now {lr:g}, e.g. {lr / 2:g}) or another --config.seed (now {seed})."
  )


class Trainer:
  """Builds everything once; ``run()`` trains to the end (or ``stop_after_steps``)."""

  def __init__(self, config: Any, workdir: str):
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.mesh = sharding.make_mesh()
    sharding.check_divisible(config.batch_size, self.mesh)
    builders.check_config(config)
    self.exp = builders.build_experiment(config)
    self.steps_per_epoch = data_lib.steps_per_epoch(len(self.exp.splits.train), config.batch_size)
    self.total_steps = int(math.ceil(config.num_epochs * self.steps_per_epoch))
    replicated = sharding.replicated(self.mesh)
    # Frozen inputs (a teacher, a class bank): loaded once, passed to every step, never saved.
    self.frozen, self.frozen_record = None, {}
    if self.exp.objective.frozen is not None:
      tree, self.frozen_record = self.exp.objective.frozen(self.exp.splits)
      self.frozen = jax.device_put(tree, replicated)
      logging.info("frozen inputs of %s: %s", config.objective.name, self.frozen_record)
    # An objective may continue its teacher's step counter (ATAT's code): the lr schedule starts there.
    start_step = int(self.frozen_record.get("schedule_start_step", 0))
    self.tx, self.schedule = builders.build_optimizer(
      config, self.exp, self.steps_per_epoch, start_step=start_step
    )
    if start_step and not float(self.schedule(0)) > 0:
      raise ValueError(
        f"the objective starts the learning-rate schedule at step {start_step} (its teacher's "
        f"step), where optim.schedule={config.optim.schedule!r} gives lr {float(self.schedule(0))}: "
        "use optim.schedule='piecewise' or 'constant', or start the student from its teacher "
        "(e.g. objective.atat.student_start='teacher')"
      )
    self.train_traces = 0  # Python-side trace counter: must stay 1 per process.

    batch_sharding = sharding.data_sharded(self.mesh)
    self.batch_sharding = batch_sharding
    train_step = step_lib.make_train_step(
      self.exp.objective, self.tx, ema_decay=config.ema_decay, schedule=self.schedule
    )

    def counted_train_step(state, batch, frozen):
      self.train_traces += 1
      return train_step(state, batch, frozen)

    self.train_step = jax.jit(
      counted_train_step,
      in_shardings=(replicated, batch_sharding, replicated),
      out_shardings=(replicated, replicated),
      donate_argnums=(0,),
    )
    # Validation also attacks the objective's adaptive loss, if it has one (CAS family).
    self.adaptive_loss = self.exp.objective.adaptive_loss if config.validation.adaptive else None
    eval_step = step_lib.make_eval_step(
      self.exp.model, config.validation.attack, adaptive_loss=self.adaptive_loss
    )
    self.eval_step = jax.jit(
      eval_step,
      in_shardings=(replicated, replicated, batch_sharding, replicated),
      out_shardings=batch_sharding,
    )
    self.finite = jax.jit(step_lib.tree_all_finite)
    self.init_fn = jax.jit(
      lambda key, batch: init_train_state(
        self.exp.model, self.exp.objective, self.tx, batch, key, ema_decay=config.ema_decay
      ),
      out_shardings=replicated,
    )

  # ------------------------------------------------------------------ state
  def _sample_batch(self) -> dict:
    h, w, c = self.exp.info.image_shape
    return {"image": np.zeros((1, h, w, c), np.float32), "label": np.zeros((1,), np.int32)}

  def initial_state(self) -> TrainState:
    state = self.init_fn(jax.random.key(self.config.seed), self._sample_batch())
    if self.config.init.workdir:
      state = builders.apply_init_from(state, self.config.init)
    return state

  # ------------------------------------------------------------- validation
  def validate(self, state: TrainState) -> dict:
    cfg = self.config.validation
    params = state.ema_params if (cfg.use_ema and self.config.ema_decay > 0) else state.params
    counts = {"clean": 0, "robust": 0, "robust_pgd": 0}
    n = 0
    key = jax.random.key(cfg.seed)
    for i, batch in enumerate(
      data_lib.eval_batches(
        self.exp.splits.val,
        batch_size=cfg.batch_size,
        multiple_of=self.mesh.devices.size,
        full_batches=True,
      )
    ):
      mask = batch.pop("mask")
      # Every host reads the whole validation batch (small) and gets the whole result.
      out = self.eval_step(
        params,
        state.model_state,
        data_lib.shard_batch(batch, self.batch_sharding, whole=True),
        jax.random.fold_in(key, i),
      )
      out = data_lib.to_host(out)
      for k in counts:
        counts[k] += int(np.sum(out[k] * mask))
      n += int(mask.sum())
    result = {
      "val/clean_accuracy": counts["clean"] / max(n, 1),
      "val/robust_accuracy": counts["robust"] / max(n, 1),
      "val/n": n,
    }
    if self.adaptive_loss is not None:
      result["val/pgd_robust_accuracy"] = counts["robust_pgd"] / max(n, 1)
    return result

  # ------------------------------------------------------------------- run
  def run(self) -> TrainState:
    config = self.config
    os.makedirs(self.workdir, exist_ok=True)
    ckpt = ckpt_lib.Checkpointer(
      os.path.join(self.workdir, "checkpoints"),
      keep=config.checkpoint.keep,
      best_metric=ckpt_lib.best_metric_for(config),
      async_save=config.checkpoint.async_save,
    )
    try:
      state = self._run(ckpt)
    except OSError as e:
      ckpt.close(quiet=True)  # finish any pending save; never hide this error behind its own
      failure = ckpt_lib.write_failure(e)
      if failure is None or isinstance(e, ckpt_lib.WorkdirWriteError):
        raise
      # A full or read-only disk hits metrics.jsonl or the run record as well as checkpoints.
      code, reason = failure
      raise ckpt_lib.WorkdirWriteError(
        f"cannot write to the workdir {self.workdir} ({reason}); {self._last_good(ckpt)}",
        code=code,
        path=self.workdir,
      ) from None
    except BaseException:
      ckpt.close(quiet=True)
      raise
    ckpt.close()
    return state

  def _last_good(self, ckpt: ckpt_lib.Checkpointer) -> str:
    step = ckpt.latest_step()
    if step is None:
      return "no checkpoint was saved yet."
    return f"the last good checkpoint (step {step}) is kept in {ckpt.directory}."

  def _check_finite(self, pending: list[tuple[int, dict]], ckpt: ckpt_lib.Checkpointer) -> None:
    """Raises ``NonFiniteError`` at the first pending step whose loss or gradient norm is
    not finite, naming the step, the metric and the remedies."""
    for step, metrics in pending:
      for name in FINITE_METRICS:
        value = float(metrics[name]) if name in metrics else 0.0
        if not math.isfinite(value):
          raise NonFiniteError(
            f"non-finite training {name} ({value}) at step {step}; "
            + self._last_good(ckpt)
            + " "
            + self._divergence_advice(ckpt)
          )

  def _divergence_advice(self, ckpt: ckpt_lib.Checkpointer) -> str:
    optim = self.config.optim
    lr, clip = float(optim.lr), float(optim.get("grad_clip", 0.0))
    clip_flag = (
      f"a smaller --config.optim.grad_clip (now {clip:g})"
      if clip > 0
      else "--config.optim.grad_clip=1.0"
    )
    start = (
      f", from this run's last good weights with --config.init.workdir={self.workdir} "
      f"--config.init.step={ckpt.latest_step()}"
      if ckpt.latest_step() is not None
      else ""
    )
    return (
      f"Train in a new --workdir (a resume refuses changed optim fields) with {clip_flag} "
      f"and a lower --config.optim.lr (now {lr:g}, e.g. {lr / 10:g}){start}; "
      "or check the data."
    )

  def _run(self, ckpt: ckpt_lib.Checkpointer) -> TrainState:
    """Resume (or start), record the launch, then train: each step logged (every
    ``log_every_steps``), validated (each epoch's end) and saved (epoch ends, every
    ``checkpoint.every_steps``, the last step) in that order."""
    config = self.config
    fingerprint = trajectory(config)
    state = self.initial_state()
    iterator = data_lib.train_iterator(
      self.exp.splits.train,
      global_batch_size=config.batch_size,
      seed=config.seed,
      augment=self.exp.info.augment,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
    state, start, finished = self._resume(ckpt, state, iterator, fingerprint)
    if finished:
      return state
    self._record_launch(start)

    writer = records.MetricsWriter(self.workdir)
    prefetch = data_lib.prefetch_to_device(
      iterator, size=config.prefetch, sharding=self.batch_sharding
    )
    stop_at = self.total_steps
    if config.stop_after_steps:
      stop_at = min(stop_at, config.stop_after_steps)
    window = _LogWindow()
    epoch_metrics: dict = {}
    t_start = time.time()
    step = start
    logging.info(
      "training %s on %s: %d steps (%d per epoch), global batch %d on %d device(s)",
      config.objective.name,
      config.data.name,
      self.total_steps,
      self.steps_per_epoch,
      config.batch_size,
      self.mesh.devices.size,
    )
    try:
      while step < stop_at:
        batch = next(prefetch)
        state, metrics = self.train_step(state, batch, self.frozen)
        step += 1
        window.pending.append((step, metrics))
        window.steps += 1
        epoch_end = step % self.steps_per_epoch == 0 or step == self.total_steps
        if step % config.log_every_steps == 0 or epoch_end or step == stop_at:
          self._log(step, stop_at, window, writer, ckpt)
        save_now = (
          epoch_end
          or step == stop_at
          or (config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0)
        )
        if epoch_end:
          epoch_metrics = self._validate_and_log(step, state, writer)
        if save_now:
          self._check_finite(window.pending, ckpt)  # steps since the last log: none may be bad
          self._save(
            ckpt, step, state, prefetch.get_state(), fingerprint, epoch_metrics if epoch_end else {}
          )
    finally:
      prefetch.close()
      writer.close()
    logging.info("trained %d steps in %.1f s", step - start, time.time() - t_start)
    return state

  def _resume(self, ckpt, state, iterator, fingerprint) -> tuple[TrainState, int, bool]:
    """``(state, start step, finished)``: the newest intact checkpoint whose trajectory
    matches (its data position set on ``iterator``; damaged newer ones are logged and
    moved aside), else ``state`` at step 0 with the config written to the workdir."""

    def check_trajectory(step: int, meta: dict) -> None:
      diff = trajectory_diff(meta.get("trajectory", {}), fingerprint)
      diff += trajectory_diff({"frozen": meta.get("frozen", {})}, {"frozen": self.frozen_record})
      if diff:
        raise ValueError(
          f"refusing to resume {self.workdir}: the config (or its frozen inputs) changed since the "
          f"checkpoint at step {step}:\n  "
          + "\n  ".join(diff)
          + "\nUse a new --workdir, or restore the original values."
        )

    found = ckpt.restore_latest(ckpt_lib.abstract_like(state), accept=check_trajectory)
    if found is not None:
      latest, state, data_state, _ = found
      if latest >= self.total_steps:
        logging.info(
          "workdir %s already finished (step %d of %d); nothing to do.",
          self.workdir,
          latest,
          self.total_steps,
        )
        return state, latest, True
      iterator.set_state(data_state)
      logging.info("resumed from step %d", latest)
      return state, latest, False
    if jax.process_index() == 0:  # one writer of the workdir's files (orbax: of checkpoints)
      records.write_json(
        os.path.join(self.workdir, "config.json"), json.loads(self.config.to_json_best_effort())
      )
    return state, 0, False

  def _record_launch(self, start: int) -> None:
    """Appends this launch (versions, devices, config, start step) to ``run_record.json``."""
    if jax.process_index() != 0:
      return
    record_path = os.path.join(self.workdir, "run_record.json")
    history = []
    if os.path.exists(record_path):
      with open(record_path) as f:
        history = json.load(f).get("launches", [])
    history.append(dict(records.run_record(self.config), start_step=start))
    records.write_json(record_path, {"launches": history})

  def _log(self, step: int, stop_at: int, window: "_LogWindow", writer, ckpt) -> None:
    """One log line and ``train/*`` metrics: the mean of the window's steps (each checked
    finite first), their rate and the ETA; opens the next window."""
    config = self.config
    self._check_finite(window.pending, ckpt)
    pending = window.pending
    scalars = {k: float(np.mean([float(m[k]) for _, m in pending])) for k in pending[0][1]}
    pending.clear()
    now = time.time()
    rate = window.steps * config.batch_size / max(now - window.start, 1e-9)
    eta = (stop_at - step) * config.batch_size / max(rate, 1e-9)
    scalars["images_per_sec"] = rate
    writer.write(step, {f"train/{k}": v for k, v in scalars.items()})
    # Objectives that train on adversarial inputs only (CAS) report no clean accuracy.
    acc_key = "accuracy" if "accuracy" in scalars else "adv_accuracy"
    # The objective's and defense's own terms (TRADES' KL, a plug-in's penalty), by name.
    terms = " ".join(
      f"{k} {v:.4g}" for k, v in sorted(scalars.items()) if k not in _LOGGED_APART | {acc_key}
    )
    logging.info(
      "step %d/%d%s epoch %.2f loss %.4f %s %.3f%s lr %.4g | %.0f img/s, ETA %s",
      step,
      stop_at,
      f" (stops early; schedule {self.total_steps})" if stop_at < self.total_steps else "",
      step / self.steps_per_epoch,
      scalars["loss"],
      acc_key.replace("accuracy", "acc"),
      scalars.get(acc_key, float("nan")),
      f" | {terms} |" if terms else "",
      scalars.get("lr", float("nan")),
      rate,
      time.strftime("%H:%M:%S", time.gmtime(eta)),
    )
    window.start, window.steps = now, 0

  def _validate_and_log(self, step: int, state: TrainState, writer) -> dict:
    """The epoch's validation metrics (``val/*``), written and logged."""
    val = self.validate(state)
    writer.write(step, val)
    logging.info(
      "validation at step %d: clean %.4f robust %.4f%s (n=%d)",
      step,
      val["val/clean_accuracy"],
      val["val/robust_accuracy"],
      f" (PGD-CE alone {val['val/pgd_robust_accuracy']:.4f})"
      if "val/pgd_robust_accuracy" in val
      else "",
      val["val/n"],
    )
    warning = chance_warning(
      val, self.exp.info.num_classes, float(self.config.optim.lr), int(self.config.seed), step
    )
    if warning:
      logging.warning("%s", warning)
    return val

  def _save(self, ckpt, step, state, data_state, fingerprint, metrics) -> None:
    if not bool(self.finite(state)):
      raise NonFiniteError(
        f"the train state has non-finite values at step {step}; not saving it. "
        + self._last_good(ckpt)
        + " "
        + self._divergence_advice(ckpt)
      )
    meta = {
      "step": step,
      "epoch": step / self.steps_per_epoch,
      "trajectory": fingerprint,
      "metrics": metrics,
      "best_metric": ckpt.best_metric,
      "frozen": self.frozen_record,
    }
    ckpt.save(step, state, data_state=data_state, meta=meta)


# Metrics the step log shows in their own places (the rest are the objective's terms).
_LOGGED_APART = {"loss", "lr", "images_per_sec"}


@dataclasses.dataclass
class _LogWindow:
  """The steps since the last log line: ``(step, metrics)`` of each, and when it began."""

  pending: list = dataclasses.field(default_factory=list)
  start: float = dataclasses.field(default_factory=time.time)
  steps: int = 0


def train_and_evaluate(config: Any, workdir: str) -> TrainState:
  """Trains ``config`` in ``workdir`` (resuming if possible) and returns the final state."""
  return Trainer(config, workdir).run()
