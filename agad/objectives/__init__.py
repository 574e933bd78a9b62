"""Adversarial-training objectives as composable loss-and-state transforms."""

from agad.objectives.base import (BNPolicy, ModelOutput, Objective, accuracy,
                                  cross_entropy_mean, forward, logits_fn_for)
from agad.objectives.registry import (OBJECTIVES, TRANSFORMS, build_objective, parse,
                                      register_objective, register_transform)
from agad.objectives.standard import attack_from_config, pgd_at, standard
