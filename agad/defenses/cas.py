"""Channel-wise activation suppressing (Bai et al. ICLR 2021), as coded in
bymavis/CAS_ICLR2021 (``Standard_Adv_Training/models/resnet_cas.py``, ``train.py``,
``attack/reg_attack.py``). Its plug-in, losses and adaptive attacks live in
:mod:`agad.defenses._cas_family`, shared with AGAIN (and FSR's ``aux_logits``).

Plug-in (``CASPlugin``, one per site): an auxiliary ``Linear(C, num_classes)`` on the
global-average-pooled input features gives aux logits (sown as ``aux/cas_logits``); the
features are multiplied channel-wise by the *raw, signed* weight row of that layer,
``W[y]`` in training (true labels) and ``W[argmax aux logits]`` at test. The head's
weight is the mask, so it also receives gradient through the masked path.

Objective (``cas``, PGD-AT based): ``CE(f(x'), y) + weight * mean_k CE(aux_k(x'), y)``
(official ``--beta 2``). Attack: PGD on the same combined loss through the eval-mode
model, i.e. running BN statistics and predicted-label masks, from a uniform start
(``random_start=True``). The update runs in train mode with true-label masks; BN running
statistics are updated by that adversarial pass only. ``adaptive_loss``: the same
combined per-example loss through the eval-mode model.

Placement: ``plugins(config, K)`` puts one plug-in at each of ``objective.cas.sites``
(default ``("features",)``; the official ResNet-18 puts one head after each of the two
units of layer4, i.e. ``("stage4.unit0", "stage4.unit1")`` here). The first defense on
the platform: one module, found by name (``...,cas`` or ``...,trades+cas``).
As a transform (``<objective>+cas``) it adds ``weight * mean_k CE(aux_k(x'), y)`` on the
inner objective's adversarial pass, keeping the inner attack.
"""

from __future__ import annotations

import functools
from typing import Any

import ml_collections

from agad.defenses._cas_family import (
  CAS_LOGITS,
  CASPlugin,
  adaptive_factory,
  adversarial_loss,
  heads_transform,
  per_example_fn,
  without_aux,
)
from agad.defenses._cas_family import aux_logits  # noqa: F401  (CAS's heads, read from ``aux``)
from agad.objectives import base, defaults

AUX_NAME = CAS_LOGITS

# CAS (Bai et al. ICLR 2021; bymavis/CAS_ICLR2021 Standard_Adv_Training).
# Fields and their comments stay aligned (the defaults are their own documentation).
# fmt: off
DEFAULTS = ml_collections.ConfigDict()
DEFAULTS.weight = 2.0                  # --beta: CE(f(x'), y) + weight * mean_k CE(aux_k(x'), y); official 2.
# Plug-in sites (one aux head each). Official ResNet-18 puts CAS after each of the two
# units of layer4 (("stage4.unit0", "stage4.unit1") here); agad's default is the final
# feature map only. "stage4.unit[-1]" names the last unit of a stage for any depth.
DEFAULTS.sites = ("features",)
DEFAULTS.random_start = "uniform"      # reg_attack.py: random_start=True, U(-eps, eps). None: config.attack.
DEFAULTS.attack_bn = "eval"            # attack with model(x, _eval=True): running stats, predicted-label masks.
# fmt: on


cas_per_example = per_example_fn("CAS", AUX_NAME)


def plugins(config: Any, num_classes: int) -> dict:
  """``{site: factory}`` for ``config.objective.cas.sites``."""
  cfg = defaults.objective_config(config, "cas", DEFAULTS)
  sites = (cfg.sites,) if isinstance(cfg.sites, str) else tuple(cfg.sites)
  return {site: functools.partial(CASPlugin, num_classes=num_classes) for site in sites}


def cas(model, config) -> base.Objective:
  """CAS objective (PGD-AT + CAS heads); hyperparameters from ``config.objective.cas``."""
  cfg = defaults.objective_config(config, "cas", DEFAULTS)
  attack = defaults.TrainingAttack(model, config, cfg)
  weight = float(cfg.weight)

  def generate(params, model_state, aux_state, batch, key, step):
    del aux_state
    loss_fn = combined_loss(model, params, model_state, batch["label"], attack.bn, weight)
    return attack.general(loss_fn, batch["image"], key, step=step)

  return base.Objective(
    "cas",
    base.no_aux_state,
    generate,
    adversarial_loss(model, cas_per_example, AUX_NAME, weight),
    base.BNPolicy(attack=attack.bn, update="adversarial"),
    _adaptive(weight),
  )


def transform(inner: base.Objective, model, config) -> base.Objective:
  """``<objective>+cas``: ``inner``'s loss + ``weight * mean_k CE(aux_k(x'), y)`` on its
  adversarial pass (the heads exist because ``plugins`` placed them); ``inner``'s attack.

  The standalone ``cas`` objective also attacks the combined loss, as the official code;
  the transform keeps the inner attack (e.g. TRADES' KL), so its adaptive attack is the
  same combined loss through the eval-mode model.
  """
  del model
  weight = float(defaults.objective_config(config, "cas", DEFAULTS).weight)
  return heads_transform(inner, "cas", AUX_NAME, weight, _adaptive(weight))


def combined_loss(net, params, model_state, labels, mode: str, weight: float):
  """``x -> [B]``: the per-example CAS loss through ``net`` in BN ``mode`` (what the
  official attack and the adaptive attacks maximise)."""
  model_state = without_aux(model_state)

  def fn(x):
    out = base.forward(net, params, model_state, x, mode=mode, labels=labels)
    return cas_per_example(out.logits, out.aux, labels, weight)

  return fn


def _adaptive(weight: float):
  """CAS's adaptive losses: :func:`adaptive_factory` on :func:`cas_per_example`."""
  return adaptive_factory(cas_per_example, weight)


def objective(model, config) -> base.Objective:
  """The standalone ``cas`` objective of the config grammar (the defense contract)."""
  return cas(model, config)
