"""Optimizer and learning-rate schedules (optax).

SGD with momentum and coupled weight decay as PyTorch's ``SGD(weight_decay=...)``
computes it (``g <- g + wd * w`` before momentum), which is what every seed
implementation uses. Schedules are defined in epochs and converted to steps.

``optim.grad_clip > 0`` rescales the loss gradient to that global L2 norm when it is larger
(``torch.nn.utils.clip_grad_norm_`` before ``SGD.step``: the clip sees the gradient of the
trainable parameters only, before weight decay is added). None of the seed papers clips; it
is there for losses too sharp for plain SGD (ATAT's ``logit_mse`` on Fashion-MNIST,
docs/results/atat.md).
"""

from __future__ import annotations

import re
from typing import Any

import optax
from flax import traverse_util

SCHEDULES = ("piecewise", "cosine", "constant")


def make_schedule(
  cfg: Any, steps_per_epoch: int, num_epochs: float, *, start_step: int = 0
) -> optax.Schedule:
  """``cfg``: lr, schedule, warmup_epochs, boundaries (epochs), decay_factor. ``start_step > 0``:
  the schedule is read at ``start_step + step`` (a run that continues another run's step
  counter, as ATAT's official code does with its teacher's restored ``global_step``)."""
  if start_step:
    inner = make_schedule(cfg, steps_per_epoch, num_epochs)
    return lambda step: inner(step + start_step)
  total = max(1, int(round(num_epochs * steps_per_epoch)))
  warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
  if cfg.schedule == "constant":
    main = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "piecewise":
    bounds = {int(round(b * steps_per_epoch)) - warmup: cfg.decay_factor for b in cfg.boundaries}
    main = optax.piecewise_constant_schedule(cfg.lr, bounds)
  elif cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(cfg.lr, max(1, total - warmup))
  else:
    raise ValueError(f"optim.schedule {cfg.schedule!r} is not one of {SCHEDULES}")
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), main], [warmup])


def _path_labels(params: Any, frozen_patterns: list[str]) -> Any:
  flat = traverse_util.flatten_dict(params, sep="/")
  labels = {
    k: ("frozen" if any(re.search(p, k) for p in frozen_patterns) else "trainable") for k in flat
  }
  return traverse_util.unflatten_dict(labels, sep="/")


def make_optimizer(
  cfg: Any,
  steps_per_epoch: int,
  num_epochs: float,
  *,
  frozen: list[str] | None = None,
  params: Any = None,
  start_step: int = 0,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """[clip] + SGD(momentum, nesterov) + weight decay; parameters matching ``frozen`` regexes
  (on '/'-joined paths) get zero updates (``optax.multi_transform``) and are outside the clip's norm.
  ``start_step``: as in :func:`make_schedule`."""
  schedule = make_schedule(cfg, steps_per_epoch, num_epochs, start_step=start_step)
  if cfg.name != "sgd":
    raise ValueError(f"optim.name {cfg.name!r} is not supported; use 'sgd'")
  clip = float(cfg.get("grad_clip", 0.0) or 0.0)
  if not clip >= 0:
    raise ValueError(
      f"optim.grad_clip={cfg.grad_clip} must be >= 0 (0 = no clipping; e.g. 1.0 "
      "clips the gradient's global L2 norm to 1)"
    )
  tx = optax.chain(
    *([optax.clip_by_global_norm(clip)] if clip > 0 else []),
    optax.add_decayed_weights(cfg.weight_decay),
    optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov),
  )
  if frozen:
    if params is None:
      raise ValueError("freezing parameters needs the parameter tree")
    tx = optax.multi_transform(
      {"trainable": tx, "frozen": optax.set_to_zero()}, _path_labels(params, frozen)
    )
  return tx, schedule
