"""Frozen teachers: another run's model and weights, loaded once on the host.

``load_teacher(workdir, step)`` builds only the teacher's model (from its
``config.json``, with its plug-ins) and reads its weights: no objective, no data.
A defense that distils from a teacher keeps a :class:`TeacherSlot` and exposes it
through ``Objective.frozen``::

    slot = TeacherSlot(cfg.teacher.workdir, cfg.teacher.step)
    ...
    return Objective(..., frozen=slot.frozen)   # the trainer calls it once per launch

so the teacher's variables reach the jitted step as ``aux_state[FROZEN]["teacher"]``,
are never checkpointed, and its params hash goes into every checkpoint's metadata (a
resume with another teacher is refused). Building the objective does not touch the
teacher's workdir, so ``agad.load`` and evaluation of the student work after the
teacher's workdir is deleted.
"""

from __future__ import annotations

import logging
import os
from typing import Any, NamedTuple

from agad import checkpoint as ckpt_lib
from agad.data import sources as data_sources
from agad.defenses._build import load_config, restore
from agad.objectives import base


class Teacher(NamedTuple):
  model: Any
  variables: dict
  params_hash: str
  step: int
  workdir: str


def load_teacher(workdir: str, step: Any = "best", *, params: str = "params") -> Teacher:
  """The frozen model of another run (``step``: ``best | latest | N``)."""
  if not workdir:
    raise ValueError(
      "the teacher's workdir is empty: set config.objective.<defense>.teacher.workdir "
      "to a finished run (e.g. a 'standard' run of the same dataset)"
    )
  restored = restore(workdir, step, params=params)
  return Teacher(
    restored.model,
    restored.variables,
    ckpt_lib.params_hash(restored.variables),
    restored.step,
    os.path.abspath(workdir),
  )


def _setting(cfg, key):
  """A dotted config value as a comparable Python value (tuples for lists)."""
  node = cfg
  for part in key.split("."):
    node = node.get(part) if hasattr(node, "get") else None
  return tuple(node) if isinstance(node, (list, tuple)) else node


def check_compatible(teacher_cfg, config, *, defense: str, field: str) -> None:
  """Refuses a teacher whose run differs from the student's in dataset, classes, image
  shape, model or input normalisation; each error names ``field`` (the config field that
  points at the teacher) and the student's field to change. ``defense`` names the caller."""
  t_info = data_sources.dataset_info(teacher_cfg.data)
  s_info = data_sources.dataset_info(config.data)
  checks = [
    ("data.name", teacher_cfg.data.name, config.data.name),
    ("number of classes", t_info.num_classes, s_info.num_classes),
    ("image shape", tuple(t_info.image_shape), tuple(s_info.image_shape)),
    ("model.name", teacher_cfg.model.name, config.model.name),
  ]
  for what, t, s in checks:
    if t != s:
      raise ValueError(
        f"the {defense} teacher was trained with {what} = {t!r}, the student uses {s!r}: "
        f"set {field} to a run of the student's dataset and model (or change the student's)"
      )
  for key, info_default in (
    ("model.input_norm", None),
    ("model.mean", "mean"),
    ("model.std", "std"),
  ):
    t, s = _setting(teacher_cfg, key), _setting(config, key)
    t = tuple(getattr(t_info, info_default)) if (t is None and info_default) else t
    s = tuple(getattr(s_info, info_default)) if (s is None and info_default) else s
    if t is not None and s is not None and t != s:
      raise ValueError(
        f"the {defense} teacher normalises its inputs with {key} = {t!r}, the student with "
        f"{s!r}; the student starts from the teacher: set config.{key} = {t!r} (or train "
        f"the teacher with the student's normalisation and point {field} to it)"
      )


def teacher_config(
  workdir: str,
  config,
  *,
  defense: str,
  field: str,
  empty_hint: str,
  start_note: str,
  from_teacher: bool = True,
):
  """The teacher run's saved config, checked before any weight is read: the field is set,
  the workdir is an agad run, the run fits the student (:func:`check_compatible`); a
  warning when the student does not start from its teacher (``init.workdir``), unless
  ``from_teacher=False`` (a student that starts elsewhere by design).

  ``empty_hint`` completes "``<defense>`` needs ..." when the field is empty;
  ``start_note`` says where the paper/code starts the student from its teacher.
  """
  if not workdir:
    raise ValueError(f"{field} is empty: {defense} needs {empty_hint}")
  if not os.path.exists(os.path.join(workdir, "config.json")):
    raise FileNotFoundError(
      f"{field} = {workdir!r} holds no config.json: point it to an agad training workdir"
    )
  teacher_cfg = load_config(workdir)
  check_compatible(teacher_cfg, config, defense=defense, field=field)
  init = os.path.abspath(config.init.workdir) if config.init.workdir else ""
  if from_teacher and init != os.path.abspath(workdir):
    logging.warning(
      "%s: init.workdir=%r is not the teacher %r; %s: add --config.init.workdir=%s",
      defense,
      config.init.workdir,
      workdir,
      start_note,
      workdir,
    )
  return teacher_cfg


class TeacherSlot:
  """A teacher loaded lazily by the trainer (``frozen``), then applied inside the step."""

  def __init__(self, workdir: str, step: Any = "best"):
    self.workdir, self.step = workdir, step
    self.model = None

  def frozen(self, splits: Any = None) -> tuple[dict, dict]:
    del splits
    teacher = load_teacher(self.workdir, self.step)
    self.model = teacher.model
    record = {
      "teacher": {
        "workdir": teacher.workdir,
        "step": teacher.step,
        "params_hash": teacher.params_hash,
      }
    }
    return {"teacher": teacher.variables}, record

  def apply(self, variables: dict, x, *, taps=(), labels=None) -> base.ModelOutput:
    """The teacher's eval-mode forward pass (running statistics, no plug-in noise)."""
    if self.model is None:
      raise RuntimeError(
        "the teacher is loaded by Objective.frozen, which the trainer calls "
        "before the first step; call slot.frozen() first outside the trainer"
      )
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}
    return base.forward(self.model, params, rest, x, mode="eval", labels=labels, taps=taps)
