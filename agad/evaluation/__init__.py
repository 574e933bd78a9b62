"""Honest robustness evaluation: per-example results, standard errors, reports."""

from agad.evaluation.robustness import accuracy_record, evaluate_pgd, stderr
