"""Adversarial-training objectives as composable loss-and-state transforms.

Each base objective is one module (``standard``, ``pgd_at``, ``trades``, ``mart``,
``alp``, ``iat``, the ``awp`` transform) under the same contract as a defense
(``DEFAULTS``, ``objective`` / ``transform``); ``agad.defenses.build_objective`` finds
them by name.
"""

from agad.objectives.base import (
  FROZEN,
  BNPolicy,
  LossAux,
  ModelOutput,
  Objective,
  accuracy,
  add_terms,
  cross_entropy_mean,
  forward,
  logits_fn_for,
  pass_key,
)
from agad.objectives.defaults import objective_config
from agad.objectives.training_attack import TrainingAttack
from agad.objectives.standard import standard
from agad.objectives.pgd_at import pgd_at
from agad.objectives.alp import alp, alp_loss
from agad.objectives.awp import awp, awp_perturbation, weight_perturbation
from agad.objectives.iat import iat
from agad.objectives.mart import mart, mart_loss
from agad.objectives.trades import trades, trades_loss
