"""``TrainingAttack``: the training PGD of one objective or defense, ``config.attack`` with
the objective's overrides (its ``attack_bn`` / ``random_start`` fields; ``None`` means
"use ``config.attack``"), plus per-call overrides of eps, step size and ``norm_ctx``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from agad.attacks import iterative as pgd_lib
from agad.objectives import base


def attack_setting(objective_cfg: Any, attack_cfg: Any, field: str, attack_field: str):
  """The objective's override of a ``config.attack`` field, or the attack's own value."""
  value = (
    objective_cfg.get(field)
    if hasattr(objective_cfg, "get")
    else getattr(objective_cfg, field, None)
  )
  return getattr(attack_cfg, attack_field) if value is None else value


class TrainingAttack:
  """The training attack of one objective: ``config.attack`` with the objective's overrides.

  ``bn`` and ``random_start`` come from the objective's ``attack_bn``/``random_start``
  fields when set, otherwise from ``config.attack``; eps, step_size, steps, norm and
  driver always come from ``config.attack``. ``config.attack.eps_warmup_steps`` (W > 0)
  ramps the radius and step size linearly, ``eps * min(1, (step + 1) / W)``, so the
  first updates see weak attacks (a recipe option for short schedules, off by default).
  """

  def __init__(self, model, config: Any, objective_cfg: Any):
    attack_cfg = config.attack
    self.model = model
    self.bn = attack_setting(objective_cfg, attack_cfg, "attack_bn", "bn")
    self.random_start = attack_setting(objective_cfg, attack_cfg, "random_start", "random_start")
    self.eps = attack_cfg.eps
    self.step_size = attack_cfg.step_size
    self.steps = attack_cfg.steps
    self.norm = attack_cfg.norm
    self.driver = getattr(attack_cfg, "driver", "auto")
    self.eps_warmup_steps = int(getattr(attack_cfg, "eps_warmup_steps", 0) or 0)
    if self.bn not in ("eval", "batch"):
      raise ValueError(
        f"training-attack BN mode {self.bn!r} must be 'eval' or 'batch' "
        "('train' would update running statistics during the attack)"
      )

  def logits_fn(self, params, model_state, norm_ctx=None):
    return base.logits_fn_for(self.model, params, model_state, mode=self.bn, norm_ctx=norm_ctx)

  def radius(self, step=None, *, eps=None, step_size=None):
    """``(eps, step_size)`` at training step ``step`` (the warm-up ramp, if any).

    ``eps``/``step_size`` override the config's values (scalars or per-example ``[B]``
    arrays, e.g. AFA's strength ladder); the warm-up ramp scales them too.
    """
    eps = self.eps if eps is None else eps
    step_size = self.step_size if step_size is None else step_size
    if not self.eps_warmup_steps or step is None:
      return eps, step_size
    scale = jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / self.eps_warmup_steps)
    return eps * scale, step_size * scale

  def __call__(
    self,
    params,
    model_state,
    images,
    labels,
    key,
    *,
    loss="ce",
    targeted=False,
    step=None,
    eps=None,
    step_size=None,
    norm_ctx=None,
  ):
    """PGD on a named loss (``"ce"``, ``"kl"``, ...) through the objective's BN mode.

    ``eps``/``step_size`` (scalar or ``[B]``) and ``norm_ctx`` (e.g. AFA's BN-branch
    routing) override the objective's attack for this call.
    """
    eps, step_size = self.radius(step, eps=eps, step_size=step_size)
    return pgd_lib.pgd(
      self.logits_fn(params, model_state, norm_ctx),
      images,
      labels,
      key,
      eps=eps,
      step_size=step_size,
      steps=self.steps,
      norm=self.norm,
      random_start=self.random_start,
      loss=loss,
      targeted=targeted,
      driver=self.driver,
    )

  def general(self, loss_fn, images, key, *, step=None, eps=None, step_size=None):
    """PGD maximising a per-example ``loss_fn(x) -> [B]`` (built by the caller, which
    also chooses its ``norm_ctx``); ``eps``/``step_size`` as in ``__call__``."""
    eps, step_size = self.radius(step, eps=eps, step_size=step_size)
    return pgd_lib.pgd_general(
      loss_fn,
      images,
      key,
      eps=eps,
      step_size=step_size,
      steps=self.steps,
      norm=self.norm,
      random_start=self.random_start,
      driver=self.driver,
    )
