"""Interpolated adversarial training (Lamb et al. 2019). There is no official code.

agad's version, after the paper's Algorithm 1 and the ndb796 reimplementation
(``interpolated_adversarial_training.py``, whose ``benign_loss`` is undefined at run time):

1. ``x' = PGD(x, y)`` on the *unmixed* batch (CE, ``config.attack``; uniform start).
2. Clean half: ``lam_c ~ Beta(a, a)``, permutation ``pi_c``; ``x_c = lam_c x + (1 - lam_c) x[pi_c]``;
   ``L_c = lam_c CE(f(x_c), y) + (1 - lam_c) CE(f(x_c), y[pi_c])`` (batch means).
3. Adversarial half: the same with an independent ``lam_a``, ``pi_a`` on ``x'``.
4. ``loss = (L_c + L_a) / 2``.

Choices (docs/objectives.md): ``a = 1`` (Beta(1, 1) = U(0, 1), the
reimplementation's ``mixup_alpha``); one scalar lambda per half per step (mixup's
convention), independent draws per half (``independent_mixing``); two train-mode passes,
clean-mixed then adversarial-mixed, each updating the BN running statistics (as the
reimplementation's two ``net(...)`` calls). The reimplementation attacks the live
train-mode network, so its 7 attack passes also update the running statistics; agad
attacks in eval mode (``attack_bn``) so that only the two training passes do. Plug-ins
that read labels see the unpermuted ``y``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from agad.attacks import losses as attack_losses
from agad.objectives import base, defaults

# No official code: agad's choices, after the ndb796 reimplementation.
# Fields and their comments stay aligned (the defaults are their own documentation).
# fmt: off
DEFAULTS = ml_collections.ConfigDict()
DEFAULTS.mixup_alpha = 1.0             # lambda ~ Beta(alpha, alpha), one scalar per half per step (mixup).
# Independent (lambda, permutation) draws for the clean half and the adversarial half
# (as the reimplementation). False: the same draw for both halves.
DEFAULTS.independent_mixing = True
DEFAULTS.random_start = None           # PGD from a uniform start (reimplementation), i.e. config.attack.
DEFAULTS.attack_bn = "eval"            # the reimplementation attacks the train-mode model (its bug); agad: eval.
# fmt: on


def mixup_batch(key: jax.Array, images: jax.Array, alpha: float):
  """``(mixed, perm, lam)``: ``lam x + (1 - lam) x[perm]`` with ``lam ~ Beta(alpha, alpha)``."""
  k_lam, k_perm = jax.random.split(key)
  lam = jax.random.beta(k_lam, alpha, alpha) if alpha > 0 else jnp.float32(1.0)
  lam = lam.astype(jnp.float32)
  perm = jax.random.permutation(k_perm, images.shape[0])
  mixed = lam * images + (1.0 - lam) * images[perm]
  return mixed, perm, lam


def mixup_cross_entropy(logits: jax.Array, labels: jax.Array, perm: jax.Array, lam) -> jax.Array:
  """``lam * mean CE(logits, y) + (1 - lam) * mean CE(logits, y[perm])``."""
  ce_a = jnp.mean(attack_losses.cross_entropy(logits, labels))
  ce_b = jnp.mean(attack_losses.cross_entropy(logits, labels[perm]))
  return lam * ce_a + (1.0 - lam) * ce_b


def iat(model, config) -> base.Objective:
  """IAT objective; hyperparameters from ``config.objective.iat`` (see defaults)."""
  cfg = defaults.objective_config(config, "iat", DEFAULTS)
  attack = defaults.TrainingAttack(model, config, cfg)
  alpha = float(cfg.mixup_alpha)
  independent = bool(cfg.independent_mixing)

  def generate(params, model_state, aux_state, batch, key, step):
    del aux_state
    return attack(params, model_state, batch["image"], batch["label"], key, loss="ce", step=step)

  def loss(params, model_state, aux_state, batch, adv, key, step):
    del step
    labels = batch["label"]
    k_clean, k_adv = jax.random.split(key)
    if not independent:
      k_adv = k_clean
    halves, passes = {}, {}
    for i, (kind, images, k) in enumerate(
      (("clean", batch["image"], k_clean), ("adv", adv, k_adv))
    ):
      mixed, perm, lam = mixup_batch(k, images, alpha)
      out = base.forward(
        model,
        params,
        model_state,
        mixed,
        mode="train",
        labels=labels,
        taps=base.ALL_TAPS,
        rng=base.pass_key(key, i),
      )
      model_state = out.model_state
      halves[kind] = (mixup_cross_entropy(out.logits, labels, perm, lam), lam)
      passes[f"{kind}_mixed"] = out
    value = 0.5 * (halves["clean"][0] + halves["adv"][0])
    metrics = {
      "loss_clean_mix": halves["clean"][0],
      "loss_adv_mix": halves["adv"][0],
      "lam_clean": halves["clean"][1],
      "lam_adv": halves["adv"][1],
    }
    return value, base.LossAux(model_state, aux_state, metrics, passes)

  return base.Objective(
    "iat",
    base.no_aux_state,
    generate,
    loss,
    base.BNPolicy(attack=attack.bn, update="clean-mixed, adversarial-mixed (two passes)"),
  )


objective = iat
