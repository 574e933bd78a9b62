"""Accuracy records with binomial standard errors ``sqrt(p (1 - p) / n)``."""

from __future__ import annotations

import math

import numpy as np


def stderr(p: float, n: int) -> float:
  return math.sqrt(max(p * (1.0 - p), 0.0) / n) if n else float("nan")


def accuracy_record(correct: np.ndarray, **settings) -> dict:
  n = int(correct.size)
  p = float(correct.mean()) if n else float("nan")
  return {**settings, "n": n, "accuracy": p, "stderr": stderr(p, n)}
