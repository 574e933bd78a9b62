"""Orbax checkpoints behind one small class (a later move to ``ocp.v1`` stays here),
and the read-only helpers that evaluation, ``agad.load`` and frozen teachers use
(``resolve_step``, ``read_state``, ``params_hash``): a bottom-level module that imports
nothing else of agad.

Each checkpoint holds three items: ``state`` (the whole TrainState), ``data`` (the input
iterator state, JSON) and ``meta`` (step, epoch, validation metrics, config fingerprint).
Retention keeps the latest ``keep`` checkpoints *and* the best one by a validation
metric (never a test metric): orbax's ``max_to_keep`` combined with ``best_fn`` would
keep only the N best, so a preservation policy combines ``LatestN`` and ``BestN``.

Damaged checkpoints (a truncated or missing file, a missing commit marker) are skipped,
never deleted. A step is *intact* when (1) its commit marker ``commit_success.txt`` and
``_CHECKPOINT_METADATA`` exist, (2) its ``meta`` and ``data`` items and the ``state``
item's ``_METADATA`` parse as JSON and its OCDBT ``manifest.ocdbt`` exists (cheap, no
array is read), (3) every value of the state's OCDBT store reads in full (tensorstore
checks each byte range, so a truncated or missing array file fails; one pass over the
bytes, without orbax's async restore, whose failures print tracebacks from its worker
threads) and (4) the restore itself succeeds. Resume and ``read_state`` /
``resolve_step`` with ``"latest"`` or ``"best"`` fall back to the newest (best) intact
step and log one line naming the damaged step; an explicit damaged step is an error
naming the reason.

A save that cannot be written (disk full, read-only file system, no permission) raises
``WorkdirWriteError``: one line naming the step, the path and the last intact step, which
stays restorable (orbax renames a step's temporary folder into place only once every file
is written, and deletes old steps only after that). With async saving a failure in the
background surfaces at the next ``save``, ``wait`` or ``close``.
"""

from __future__ import annotations

import hashlib
import json
import logging as py_logging
import os
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

BEST_METRIC = "val/robust_accuracy"
BEST_METRICS = ("val/robust_accuracy", "val/clean_accuracy")

from ._damage import COMMIT_MARKER, ITEMS, _listdir, _unreadable_arrays, damage  # noqa: F401
from ._multiprocess import this_process_only  # noqa: F401
from ._write_errors import (
  WRITE_ERRNOS,
  WorkdirWriteError,
  _QUIET,
  _quiet_closed_event_loops,  # noqa: F401
  _short,
  write_failure,
)


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
  """Save / restore TrainState + data-iterator state + metadata in ``directory``.

  ``save`` / ``wait`` / ``close`` raise ``WorkdirWriteError`` (one line: the step, the path,
  the last intact step) when a step cannot be written; with async saving, ``save`` and
  ``wait`` first check that the previous step was committed.
  """

  def __init__(
    self,
    directory: str,
    *,
    keep: int = 2,
    best_metric: str = BEST_METRIC,
    async_save: bool = True,
    create: bool = True,
    local: bool = False,
  ):
    self.directory = os.path.abspath(directory)
    self.best_metric = best_metric
    self._pending: int | None = None  # a step handed to orbax, not yet checked committed
    py_logging.getLogger("absl").addFilter(_QUIET)  # a logger keeps one copy of a filter
    policy = policies.AnyPreservationPolicy(
      [
        policies.LatestN(n=keep),
        policies.BestN(
          get_metric_fn=lambda m: m[best_metric],
          reverse=False,
          n=1,
          keep_checkpoints_without_metrics=False,
        ),
      ]
    )
    options = ocp.CheckpointManagerOptions(
      preservation_policy=policy,
      enable_async_checkpointing=async_save,
      best_fn=lambda m: m[best_metric],
      best_mode="max",
      keep_checkpoints_without_metrics=True,
      create=create,
      # The step's temporary folder is made in the caller's thread: made in the background,
      # a failed mkdir (read-only or full disk) left orbax's writer threads waiting 300 s
      # for it, and the process hung that long after the error (measured, orbax 0.12.8).
      async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
      multiprocessing_options=this_process_only()
      if local
      else ocp.options.MultiprocessingOptions(),
    )
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "data", "meta")
    )
    self._async = async_save

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
    """Saves ``step`` (in the background with async saving).

    Raises:
      WorkdirWriteError: this step, or the previous async one, could not be written.
    """
    self._confirm()
    metrics = meta.get("metrics") or None
    if metrics is not None and self.best_metric not in metrics:
      metrics = None
    try:
      self._manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(data_state),
          meta=ocp.args.JsonSave(meta),
        ),
        metrics=metrics,
        force=True,
      )
    except Exception as e:  # noqa: BLE001  (only write failures are translated)
      self._raise_if_write_failure(step, e)
      raise
    self._pending = step
    if not self._async:  # written already: check it now
      self._confirm()

  def _confirm(self) -> None:
    """Waits for the pending save and checks that its step was committed on disk."""
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      self._raise_if_write_failure(step, e)
      raise
    if step is not None and (reason := damage(self.directory, step)) is not None:
      # Orbax can log a failed finalisation without raising it; the folder is the truth.
      raise WorkdirWriteError(
        f"checkpoint step {step} was not committed to {self.directory} ({reason}); "
        f"{self._last_intact_note(step)}",
        path=self.directory,
      )

  def _raise_if_write_failure(self, step: int | None, error: BaseException) -> None:
    failure = write_failure(error)
    if failure is None:
      return
    _quiet_closed_event_loops()
    code, reason = failure
    what = f"checkpoint step {step}" if step is not None else "a checkpoint"
    raise WorkdirWriteError(
      f"cannot write {what} to {self.directory} ({reason}); {self._last_intact_note(step)}",
      code=code,
      path=self.directory,
    ) from None

  def _last_intact_note(self, failed: int | None) -> str:
    """Names the newest intact step on disk: the one a re-run resumes from."""
    steps = sorted((int(d) for d in _listdir(self.directory) if d.isdigit()), reverse=True)
    good = next((s for s in steps if s != failed and damage(self.directory, s) is None), None)
    fix = "free space or make it writable, then re-run the same command to resume"
    if good is None:
      return f"no earlier checkpoint was saved: {fix} from the start"
    return f"the last good checkpoint, step {good}, is kept and restorable: {fix} from it"

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """Restores ``(state, data_state, meta)``; ``abstract_state`` carries shardings."""
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
      ),
    )
    return restored["state"], dict(restored["data"]), dict(restored["meta"])

  def restore_latest(
    self, abstract_state: Any, *, accept: Callable[[int, dict], None] | None = None
  ) -> tuple[int, Any, dict, dict] | None:
    """Restores the newest intact step: ``(step, state, data_state, meta)``, or None if none saved.

    Steps newer than it that are damaged (``damage`` with ``read_arrays``, or their
    restore fails) are logged in one line each ("checkpoint step N is damaged
    (<reason>); resuming from step M") and moved, never deleted, to
    ``<directory>.damaged/`` so that training can save those step numbers again. ``accept(step, meta)`` runs on a candidate's metadata before its
    state is read and may raise (e.g. a changed config); its errors propagate.

    Raises:
      ValueError: checkpoints exist but none is intact (each step named with its reason).
    """
    damaged: dict[int, str] = {}
    found = None
    for step in sorted(self.all_steps(), reverse=True):
      reason = damage(self.directory, step, read_arrays=True)
      if reason is None:
        try:
          meta = self.read_meta(step)
        except Exception as e:  # noqa: BLE001  (any unreadable metadata is damage)
          reason = f"meta unreadable: {_short(e)}"
      if reason is None:
        if accept is not None:
          accept(step, meta)
        try:
          state, data_state, meta = self.restore(step, abstract_state)
          found = (step, state, data_state, meta)
          break
        except Exception as e:  # noqa: BLE001  (tensorstore raises ValueError, OSError, ...)
          reason = f"restore failed: {_short(e)}"
      damaged[step] = reason
    if damaged and found is None:
      raise ValueError(
        f"no intact checkpoint in {self.directory}; damaged steps: "
        + "; ".join(f"{s} ({r})" for s, r in damaged.items())
        + ". Move them aside to start afresh, or use a new --workdir."
      )
    for step, reason in damaged.items():
      kept = self.set_aside(step)
      logging.warning(
        "checkpoint step %d is damaged (%s); resuming from step %d (the damaged one is kept in %s)",
        step,
        reason,
        found[0],
        kept,
      )
    return found

  def set_aside(self, step: int) -> str:
    """Moves saved ``step`` to ``<directory>.damaged/<step>[.k]`` (never deletes it); returns its path."""
    aside = self.directory.rstrip(os.sep) + ".damaged"
    os.makedirs(aside, exist_ok=True)
    target, k = os.path.join(aside, str(step)), 1
    while os.path.exists(target):
      target, k = os.path.join(aside, f"{step}.{k}"), k + 1
    try:
      os.rename(os.path.join(self.directory, str(step)), target)
    except FileNotFoundError:  # another process of a multi-process run moved it first
      pass
    self._manager.reload()
    return target

  def read_meta(self, step: int) -> dict:
    path = os.path.join(self.directory, str(step), "meta", "metadata")
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def wait(self) -> None:
    """Blocks until the pending save is written; ``WorkdirWriteError`` if it could not be."""
    self._confirm()

  def close(self, *, quiet: bool = False) -> None:
    """Finishes the pending save and closes. ``quiet``: never raise (the caller is already
    raising an error that this one must not hide); a failure is logged in one line."""
    try:
      self._confirm()
    except Exception as e:  # noqa: BLE001
      if not quiet:
        self._close_manager()
        raise
      logging.warning("while stopping: %s", e if isinstance(e, WorkdirWriteError) else _short(e))
    self._close_manager()

  def _close_manager(self) -> None:
    try:
      self._manager.close()
    except Exception as e:  # noqa: BLE001
      # A write failure was already raised (or logged) by _confirm; orbax re-raises it
      # from another of its threads here.
      if write_failure(e) is None:
        raise


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


def _read_state(directory: str, step: int) -> dict:
  """Saved ``step``'s TrainState as nested dicts of host numpy arrays, on any topology.

  The target is built from the checkpoint's own array metadata, so a state saved on 4
  devices reads on 1 (orbax refuses a target-less restore across topologies).
  """
  path = os.path.join(os.path.abspath(directory), str(step), "state")
  handler = ocp.StandardCheckpointHandler(
    multiprocessing_options=this_process_only()
  )  # item metadata
  try:
    tree = handler.metadata(epath.Path(path))
  finally:
    handler.close()
  target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree)
  with ocp.StandardCheckpointer(multiprocessing_options=this_process_only()) as checkpointer:
    return checkpointer.restore(path, target)


def _select(
  directory: str,
  step: Any,
  best_metric: str | None,
  verify: bool,
  read: Callable[[int], Any] | None = None,
) -> tuple[int, Any]:
  """``resolve_step``'s rule; also returns ``read(step)`` of the chosen step (None if no ``read``).

  ``"latest"`` / ``"best"`` try the candidates newest (best) first and take the first
  intact one (``damage`` is None and ``read`` succeeds), logging the damaged ones; an
  explicit step that is damaged is an error. Every message names the damaged steps and
  the intact ones.
  """
  if best_metric is None:
    config_path = os.path.join(os.path.dirname(os.path.abspath(directory)), "config.json")
    best_metric = BEST_METRIC
    if os.path.exists(config_path):
      with open(config_path) as f:
        best_metric = best_metric_for(json.load(f))
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f"no checkpoints in {directory}; train first with python -m launch.train"
    )
  ckpt = Checkpointer(directory, best_metric=best_metric, create=False, local=True)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(
        f"no checkpoints in {directory}; train first with python -m launch.train"
      )
    damaged = {s: r for s in steps if (r := damage(directory, s)) is not None}
    looks_intact = [s for s in steps if s not in damaged]
    if step in (None, "latest"):
      candidates = sorted(looks_intact, reverse=True)
    elif step == "best":
      scored = []
      for s in looks_intact:
        meta = ckpt.read_meta(s)
        value = meta.get("metrics", {}).get(meta.get("best_metric") or best_metric)
        if value is not None:
          scored.append((value, s))
      # Highest metric first; ties go to the earliest step, as best_step does.
      candidates = [s for _, s in sorted(scored, key=lambda vs: (-vs[0], vs[1]))]
      if not candidates and len(looks_intact) == 1:
        candidates = looks_intact  # the only checkpoint (an imported one has no metrics)
      if not candidates:
        extra = f" (damaged: {_describe(damaged)})" if damaged else ""
        raise ValueError(
          f"no intact checkpoint in {directory} has validation metrics{extra} (a run "
          "without a validation split has no 'best'): pass --step=latest "
          "(step='latest' from Python)"
        )
    else:
      requested = int(step)
      if requested not in steps:
        raise ValueError(f"step {requested} not saved in {directory}; saved steps: {steps}")
      candidates = [requested]
    chosen, value = None, None
    for s in candidates:
      if s in damaged:
        continue
      if verify and (reason := _unreadable_arrays(os.path.join(directory, str(s), "state"))):
        damaged[s] = reason
        continue
      try:
        value = read(s) if read is not None else None
        chosen = s
        break
      except Exception as e:  # noqa: BLE001  (tensorstore raises ValueError, OSError, ...)
        damaged[s] = f"restore failed: {_short(e)}"
    if step not in (None, "latest", "best") and int(step) in damaged:
      intact = [s for s in steps if s not in damaged]
      raise ValueError(
        f"checkpoint step {int(step)} in {directory} is damaged "
        f"({damaged[int(step)]}); steps that look intact: {intact}"
      )
    if chosen is None:
      raise ValueError(f"no intact checkpoint in {directory}; damaged steps: {_describe(damaged)}")
    skipped = {s: r for s, r in damaged.items() if step == "best" or s > chosen}
    if skipped:
      intact = [s for s in steps if s not in damaged]
      if len(skipped) == 1:
        ((bad, reason),) = skipped.items()
        what = f"checkpoint step {bad} is damaged ({reason})"
      else:
        what = f"checkpoint steps {sorted(skipped)} are damaged ({_describe(skipped)})"
      logging.warning("%s; using step %d instead (intact steps: %s)", what, chosen, intact)
    return chosen, value
  finally:
    ckpt.close()


def _describe(damaged: dict[int, str]) -> str:
  return "; ".join(f"step {s}: {r}" for s, r in sorted(damaged.items()))


def resolve_step(
  directory: str, step: Any, *, best_metric: str | None = None, verify: bool = True
) -> int:
  """'latest' | 'best' | int -> an intact saved step number in a checkpoint directory.

  ``best_metric`` (default: read from the run's ``config.json`` next to ``directory``)
  picks "best" for checkpoints that predate the metric being recorded in their metadata.
  ``"best"`` of a directory whose only intact step has no validation metrics (an imported
  checkpoint) is that step.
  ``"latest"`` / ``"best"`` skip damaged steps (see the module docstring) with a warning
  naming them and the intact ones; a damaged explicit step raises ``ValueError``.
  ``verify`` also reads every byte of the candidate's state (finds truncated or missing
  array files); without it only the structural ``damage`` checks run.
  """
  return _select(directory, step, best_metric, verify)[0]


def read_state(workdir: str, step: Any = "latest", *, with_key: bool = False) -> tuple[dict, int]:
  """The raw saved TrainState of a workdir as nested dicts of numpy arrays, and its step.

  No model, objective or data is built: any workdir can be read, on any number of
  devices. ``"latest"`` / ``"best"`` skip damaged checkpoints (``resolve_step``).
  ``with_key`` keeps the trainer's PRNG key (raw uint32 data; for bitwise run comparisons).
  """
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  step, raw = _select(directory, step, None, True, lambda s: _read_state(directory, s))
  if not with_key:
    raw.pop("key", None)  # Nothing outside the trainer needs the PRNG key.
  return jax.tree.map(np.asarray, raw), step
