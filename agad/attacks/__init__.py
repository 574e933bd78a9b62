"""Attacks over a pure ``logits_fn`` (or a per-example ``loss_fn``), in pixel space [0, 1]."""

from agad.attacks.driver import DRIVERS, iterate, resolve_driver
from agad.attacks.losses import cross_entropy, kl_divergence, margin
from agad.attacks.iterative import (PGDState, fgsm, pgd, pgd_general, pgd_init, pgd_step,
                              project)

__all__ = [
    "DRIVERS", "iterate", "resolve_driver", "cross_entropy", "kl_divergence", "margin",
    "PGDState", "fgsm", "pgd", "pgd_general", "pgd_init", "pgd_step", "project",
]
