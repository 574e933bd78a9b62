"""AutoAttack's progress file: an interrupted run goes on from the last batch it finished.

``Progress`` holds the per-example results and the position (stage, round, the round's
points, batches done) and writes them after every batch, atomically and by process 0 only
(every host of a multi-host run reads the same file, as with the evaluation cache). Per-
example keys make a resumed run's results those of an uninterrupted one. The file carries a
hash of the inputs, key and settings and the model's clean predictions: a file from another
run is refused with the fix, never silently mixed in.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

# The per-example results of AutoAttack's ``_Run`` that the file saves and restores.
_RESULTS = ("robust", "adversarial", "adv_pred", "broken_by", "zero_grad")


@dataclasses.dataclass
class Position:
  """Where a run stands: in stage ``stage``, round ``round``, whose points are ``indices``;
  the first ``batches_done`` batches are done, after ``stage_s`` seconds in the stage.
  ``batches_done == 0`` is the start of the stage."""

  stage: int
  round: int = 0
  indices: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.int64))
  batches_done: int = 0
  stage_s: float = 0.0


def run_identity(images, labels, key, **settings) -> str:
  """A hash of everything that fixes a run's per-example results except the model (whose
  clean predictions are checked instead): inputs, key and settings."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  h = hashlib.sha256()
  for array in (np.asarray(images), np.asarray(labels), np.asarray(key)):
    h.update(str((array.dtype, array.shape)).encode())
    h.update(np.ascontiguousarray(array).tobytes())
  h.update(json.dumps(settings, sort_keys=True, default=str).encode())
  return h.hexdigest()


class Progress:
  """The progress of one run (``run``: AutoAttack's per-example results) kept in ``path``.

  Opening restores ``run`` from an existing file; then ``per_attack``, ``times``,
  ``start_time`` (shifted back by the seconds spent before), ``position`` (``None`` for a
  fresh run) and ``resumed`` (``None``, or where it went on) describe where to go on.
  """

  def __init__(self, path: str, identity: str, run, clean_pred, plan_names, start_time: float):
    self.path, self.identity, self.run, self.clean_pred = path, identity, run, clean_pred
    self.per_attack: collections.OrderedDict[str, float] = collections.OrderedDict()
    self.times: dict[str, float] = {}
    self.start_time = start_time
    self.position: Position | None = None
    self.resumed: dict | None = None
    try:
      with open(path, "rb") as f:  # one read: process 0 may replace or remove it meanwhile
        state = dict(np.load(f, allow_pickle=False))
    except FileNotFoundError:
      return
    self._load(state, plan_names)

  def _refuse(self, why: str):
    raise ValueError(
      f"AutoAttack progress file {self.path} was written {why}: resume with the same "
      "ones, or delete the file to start afresh"
    )

  def _load(self, state: dict, plan_names) -> None:
    if str(state["identity"]) != self.identity:
      self._refuse(
        "by a run with other images, labels, key or settings (eps, norm, version, "
        "steps, queries, targets, batch_size, min_bucket)"
      )
    if not np.array_equal(state["clean_pred"], self.clean_pred):
      changed = int((state["clean_pred"] != self.clean_pred).sum())
      self._refuse(
        f"for another model: {changed} of {len(self.clean_pred)} clean predictions differ (weights)"
      )
    for name in _RESULTS:
      setattr(self.run, name, state[name].copy())
    self.run.broken_by = self.run.broken_by.astype(object)
    stage, round_index, batches_done = (int(v) for v in state["position"])
    self.position = Position(
      stage, round_index, state["indices"], batches_done, float(state["stage_s"])
    )
    self.per_attack.update(json.loads(str(state["per_attack"])))
    self.times = json.loads(str(state["times"]))
    earlier_s = float(state["elapsed_s"])
    self.start_time -= earlier_s
    where = plan_names[stage] if stage < len(plan_names) else "the end"
    self.resumed = dict(
      stage=where, round=round_index, batches_done=batches_done, earlier_s=earlier_s
    )

  def describe(self) -> str:
    """A log line for a resumed run."""
    r = self.resumed
    return (
      f"[autoattack] resuming from {self.path}: {r['stage']}, round {r['round'] + 1}, after "
      f"{r['batches_done']} batches; robust accuracy {self.run.robust.mean():.2%}, "
      f"{r['earlier_s']:.0f} s spent before"
    )

  def position_in(self, stage: int) -> Position | None | bool:
    """``False`` if ``stage`` was done before the interruption, else where to start it
    (``None``: from its beginning)."""
    if self.position is None or stage > self.position.stage:
      return None
    return self.position if stage == self.position.stage else False

  def save(self, position: Position) -> None:
    if jax.process_index() != 0:
      return
    tmp = self.path + ".tmp"
    with open(tmp, "wb") as f:
      np.savez(
        f,
        identity=self.identity,
        clean_pred=self.clean_pred,
        **{name: getattr(self.run, name) for name in _RESULTS if name != "broken_by"},
        broken_by=self.run.broken_by.astype(str),
        position=np.asarray([position.stage, position.round, position.batches_done]),
        indices=np.asarray(position.indices, np.int64),
        stage_s=position.stage_s,
        per_attack=json.dumps(self.per_attack),
        times=json.dumps(self.times),
        elapsed_s=time.time() - self.start_time,
      )
    os.replace(tmp, self.path)

  def remove(self) -> None:
    if jax.process_index() == 0 and os.path.exists(self.path):
      os.remove(self.path)
