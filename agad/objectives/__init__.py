"""Adversarial-training objectives as composable loss-and-state transforms."""

from agad.objectives.base import (BNPolicy, ModelOutput, Objective, accuracy,
                                  cross_entropy_mean, forward, logits_fn_for)
from agad.objectives.registry import (OBJECTIVES, TRANSFORMS, build_objective, parse,
                                      register_objective, register_transform)
from agad.objectives.standard import pgd_at, standard
from agad.objectives.alp import alp, alp_loss
from agad.objectives.awp import awp, awp_perturbation, weight_perturbation
from agad.objectives.cas import CASPlugin, cas, cas_plugins
from agad.objectives.defaults import objective_config, objective_defaults
from agad.objectives.iat import iat
from agad.objectives.mart import mart, mart_loss
from agad.objectives.plugins import PLUGIN_BUILDERS, plugins_for, register_plugins
from agad.objectives.trades import trades, trades_loss
