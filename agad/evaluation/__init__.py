"""Honest robustness evaluation: per-example results, standard errors, checks, reports."""

from agad.evaluation.robustness import accuracy_record, stderr
from agad.evaluation.suite import AttackSpec, Suite, params_hash, run_suite
from agad.evaluation.presets import PRESETS, build_specs
from agad.evaluation.autoattack_api import autoattack
from agad.evaluation.checkpoint_eval import evaluate
