"""Orbax checkpoints behind one small class (a later move to ``ocp.v1`` stays here),
and the read-only helpers that evaluation, ``agad.load`` and frozen teachers use
(``resolve_step``, ``read_state``, ``params_hash``): a bottom-level module that imports
nothing else of agad.

Each checkpoint holds three items: ``state`` (the whole TrainState), ``data`` (the input
iterator state, JSON) and ``meta`` (step, epoch, validation metrics, config fingerprint).
Retention keeps the latest ``keep`` checkpoints *and* the best one by a validation
metric (never a test metric): orbax's ``max_to_keep`` combined with ``best_fn`` would
keep only the N best, so a preservation policy combines ``LatestN`` and ``BestN``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

BEST_METRIC = "val/robust_accuracy"
BEST_METRICS = ("val/robust_accuracy", "val/clean_accuracy")


def best_metric_for(config: Any) -> str:
  """The validation metric that picks the "best" checkpoint of a run.

  ``checkpoint.best_metric`` if set (the configs set clean accuracy for standard
  training), else robust validation accuracy. Every checkpoint also records the metric
  it was chosen by, which ``best_step`` prefers.
  """
  chosen = str(config.get("checkpoint", {}).get("best_metric", "") or "") or BEST_METRIC
  if chosen not in BEST_METRICS:
    raise ValueError(f"checkpoint.best_metric={chosen!r} is not one of {BEST_METRICS}")
  return chosen


class Checkpointer:
  """Save / restore TrainState + data-iterator state + metadata in ``directory``."""

  def __init__(self, directory: str, *, keep: int = 2, best_metric: str = BEST_METRIC,
               async_save: bool = True, create: bool = True):
    self.directory = os.path.abspath(directory)
    self.best_metric = best_metric
    policy = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep),
        policies.BestN(get_metric_fn=lambda m: m[best_metric], reverse=False, n=1,
                       keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=async_save,
        best_fn=lambda m: m[best_metric], best_mode="max",
        keep_checkpoints_without_metrics=True, create=create)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def best_step(self) -> int | None:
    """The step with the highest validation metric among saved checkpoints.

    The metric is the one recorded in each checkpoint's metadata (``best_metric``,
    written by the trainer), else this checkpointer's ``best_metric``.
    """
    best, best_value = None, None
    for step in self.all_steps():
      meta = self.read_meta(step)
      value = meta.get("metrics", {}).get(meta.get("best_metric") or self.best_metric)
      if value is not None and (best_value is None or value > best_value):
        best, best_value = step, value
    return best

  def save(self, step: int, state: Any, *, data_state: dict, meta: dict) -> None:
    metrics = meta.get("metrics") or None
    if metrics is not None and self.best_metric not in metrics:
      metrics = None
    self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                data=ocp.args.JsonSave(data_state),
                                meta=ocp.args.JsonSave(meta)),
        metrics=metrics, force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """Restores ``(state, data_state, meta)``; ``abstract_state`` carries shardings."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=ocp.args.JsonRestore(),
                                      meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["data"]), dict(restored["meta"])

  def read_meta(self, step: int) -> dict:
    path = os.path.join(self.directory, str(step), "meta", "metadata")
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(state: Any) -> Any:
  """Shape/dtype/sharding skeleton of ``state`` for restoring into the same layout."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def params_hash(variables: Any) -> str:
  """sha256 over every leaf's bytes, dtype, shape and path: identifies a checkpoint's weights."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    leaf = np.asarray(leaf)
    h.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape}".encode())
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()[:24]


def resolve_step(directory: str, step: Any, *, best_metric: str | None = None) -> int:
  """'latest' | 'best' | int -> a saved step number in a checkpoint directory.

  ``best_metric`` (default: read from the run's ``config.json`` next to ``directory``)
  picks "best" for checkpoints that predate the metric being recorded in their metadata.
  """
  if best_metric is None:
    config_path = os.path.join(os.path.dirname(os.path.abspath(directory)), "config.json")
    best_metric = BEST_METRIC
    if os.path.exists(config_path):
      with open(config_path) as f:
        best_metric = best_metric_for(json.load(f))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints in {directory}; train first with python -m launch.train")
  ckpt = Checkpointer(directory, best_metric=best_metric, create=False)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoints in {directory}; train first with python -m launch.train")
    if step in (None, "latest"):
      return max(steps)
    if step == "best":
      best = ckpt.best_step()
      if best is None:
        raise ValueError(f"no checkpoint in {directory} has validation metrics; use step='latest'")
      return best
    step = int(step)
    if step not in steps:
      raise ValueError(f"step {step} not saved in {directory}; saved steps: {steps}")
    return step
  finally:
    ckpt.close()


def read_state(workdir: str, step: Any = "latest") -> tuple[dict, int]:
  """The raw saved TrainState of a workdir as nested dicts of numpy arrays, and its step.

  No model, objective or data is built: any workdir can be read.
  """
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  step = resolve_step(directory, step)
  path = os.path.join(directory, str(step), "state")
  with ocp.StandardCheckpointer() as checkpointer:
    raw = checkpointer.restore(path)  # no target: nested dicts
  raw.pop("key", None)  # A typed PRNG key; nothing outside the trainer needs it.
  return jax.tree.map(np.asarray, raw), step
