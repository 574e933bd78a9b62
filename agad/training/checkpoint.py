"""Orbax checkpoints behind one small class (a later move to ``ocp.v1`` stays here).

Each checkpoint holds three items: ``state`` (the whole TrainState), ``data`` (the input
iterator state, JSON) and ``meta`` (step, epoch, validation metrics, config fingerprint).
Retention keeps the latest ``keep`` checkpoints *and* the best one by a validation
metric (never a test metric): orbax's ``max_to_keep`` combined with ``best_fn`` would
keep only the N best, so a preservation policy combines ``LatestN`` and ``BestN``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

BEST_METRIC = "val/robust_accuracy"
BEST_METRICS = ("val/robust_accuracy", "val/clean_accuracy")


def best_metric_for(config: Any) -> str:
  """The validation metric that picks the "best" checkpoint of a run.

  ``checkpoint.best_metric`` if set; otherwise clean validation accuracy for standard
  (non-adversarial) training and robust validation accuracy for everything else.
  """
  chosen = str(config.get("checkpoint", {}).get("best_metric", "") or "")
  if not chosen:
    objective = str(config.get("objective", {}).get("name", ""))
    chosen = "val/clean_accuracy" if objective == "standard" else BEST_METRIC
  if chosen not in BEST_METRICS:
    raise ValueError(f"checkpoint.best_metric={chosen!r} is not one of {BEST_METRICS}")
  return chosen


class Checkpointer:
  """Save / restore TrainState + data-iterator state + metadata in ``directory``."""

  def __init__(self, directory: str, *, keep: int = 2, best_metric: str = BEST_METRIC,
               async_save: bool = True):
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
        keep_checkpoints_without_metrics=True, create=True)
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
