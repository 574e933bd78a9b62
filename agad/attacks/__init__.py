"""Attacks over a pure ``logits_fn`` (or a per-example ``loss_fn``), in pixel space [0, 1]."""

# The version of the attack code's semantics, part of every evaluation cache key
# (``agad.evaluation.suite.cache_key``): bump it whenever a change to an attack can change
# which examples it breaks (a new default, a fixed bug, a different step rule), so that
# cached per-example results computed by older code are never reused.
# 2: PGD-family rows keep the best (misclassified) iterate (track_best); AutoAttack flags.
# 3: per-example keys in APGD / FAB / Square / AutoAttack (fold_in of the example index);
#    FAB's L-inf projection by bisection (equal up to float rounding); finer buckets.
# 4: the evaluation suite's PGD / C&W / FGSM / adaptive / transfer rows draw per-example keys
#    (fold_in of the seed and restart key with the example's index).
ATTACK_CODE_VERSION = 4

from agad.attacks.driver import DRIVERS, iterate, resolve_driver
from agad.attacks.losses import cross_entropy, kl_divergence, margin
from agad.attacks.iterative import (
  MIMState,
  PGDState,
  bim,
  fgsm,
  mim,
  pgd,
  pgd_general,
  pgd_init,
  pgd_step,
  project,
)

from agad.attacks.dlr import dlr, dlr_targeted, ranked_targets
from agad.attacks.apgd import APGDResult, apgd, apgd_attack, apgd_checkpoints, apgd_targeted
from agad.attacks.fab import FABResult, fab, fab_attack
from agad.attacks.square import SquareResult, square, square_attack
from agad.attacks.autoattack import autoattack

__all__ = [
  "ATTACK_CODE_VERSION",
  "dlr",
  "dlr_targeted",
  "ranked_targets",
  "APGDResult",
  "apgd",
  "apgd_attack",
  "apgd_checkpoints",
  "apgd_targeted",
  "FABResult",
  "fab",
  "fab_attack",
  "SquareResult",
  "square",
  "square_attack",
  "autoattack",
  "DRIVERS",
  "iterate",
  "resolve_driver",
  "cross_entropy",
  "kl_divergence",
  "margin",
  "MIMState",
  "PGDState",
  "bim",
  "mim",
  "fgsm",
  "pgd",
  "pgd_general",
  "pgd_init",
  "pgd_step",
  "project",
]
