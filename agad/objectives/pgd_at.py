"""PGD adversarial training (Madry et al. 2018).

PGD-AT minimises ``E[max_{||d|| <= eps} CE(f(x + d), y)]`` (Madry et al., Eq. 2.1): the
inner maximisation is PGD on CE (``config.attack``), the outer loss the mean
cross-entropy on ``x'`` only, as in MadryLab/cifar10_challenge. BN: the attack uses the
running statistics (``config.attack.bn``); the adversarial train-mode pass updates them.
Its pass is ``"adv"``.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from agad.objectives import base, defaults
from agad.objectives.standard import loss_on

# Fields and their comments stay aligned (the defaults are their own documentation).
# fmt: off
DEFAULTS = ml_collections.ConfigDict()  # Everything lives in config.attack.
# fmt: on


def pgd_at(model, config: Any) -> base.Objective:
  """Madry PGD-AT: CE on PGD examples (``config.attack``); BN updated by the adversarial pass."""
  attack = defaults.TrainingAttack(model, config, None)

  def generate(params, model_state, aux_state, batch, key, step):
    del aux_state
    return attack(params, model_state, batch["image"], batch["label"], key, loss="ce", step=step)

  return base.Objective(
    "pgd_at",
    base.no_aux_state,
    generate,
    loss_on(model, "adv"),
    base.BNPolicy(attack=attack.bn, update="adversarial"),
  )


objective = pgd_at
