"""Adversarial logit pairing (Kannan et al. 2018), as coded in tensorflow/models
``research/adversarial_logit_pairing/train.py``.

One train-mode forward pass over the concatenated batch ``[x; x']`` (one BN batch of
2B images, updating the running statistics once), then

    loss = mean_{2B} CE_smooth([z(x); z(x')], [y; y]) + weight * mean_{B,K} (z(x) - z(x'))^2

``tf.losses.softmax_cross_entropy(label_smoothing=0.1)`` puts ``1 - s + s/K`` on the true
class; ``tf.losses.mean_squared_error(weights=0.5)`` uses the default
``SUM_BY_NONZERO_WEIGHTS`` reduction, i.e. ``0.5 * mean`` over all B*K logits (the
scalar weight is *not* cancelled, unlike TF's ``Reduction.MEAN``).

Attack (``adversarial_attack.py``, ``pgdll_EPS_STEP_NITER``): targeted PGD towards the
least-likely class of the clean eval-mode logits, descending the summed CE, from a
uniform start, with the model in eval mode (``is_training=False``). ``target`` selects
``"least_likely"`` (official ALP runs), ``"random"`` (``pgdrnd``) or ``"untargeted"``
(``pgd``: ascends CE on the *predicted* label, as the official code does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from agad.objectives import base, defaults

TARGETS = ("least_likely", "random", "untargeted")

# Fields and their comments stay aligned (the defaults are their own documentation).
# fmt: off
DEFAULTS = ml_collections.ConfigDict()
DEFAULTS.weight = 0.5                  # train_lp_weight: weight * mean((z(x) - z(x'))^2); README: 0.5.
DEFAULTS.label_smoothing = 0.1         # model_lib.default_hparams(): label_smoothing=0.1 on [x; x'].
# Training attack target: "least_likely" (pgdll_*: targeted PGD towards argmin of the
# clean eval-mode logits, the official setting), "random" (pgdrnd_*) or "untargeted"
# (pgd_*: the official code's untargeted option uses the *predicted* label).
DEFAULTS.target = "least_likely"
DEFAULTS.random_start = None           # official: U(-eps, eps), i.e. config.attack's usual "uniform".
DEFAULTS.attack_bn = "eval"            # attack on model_fn(x, is_training=False).
# fmt: on


def alp_loss(
  logits_clean: jax.Array,
  logits_adv: jax.Array,
  labels: jax.Array,
  *,
  weight: float,
  label_smoothing: float = 0.1,
) -> jax.Array:
  """ALP's scalar: smoothed CE over ``[x; x']`` + ``weight * mean((z(x) - z(x'))^2)``."""
  logits = jnp.concatenate([logits_clean, logits_adv], axis=0).astype(jnp.float32)
  xent = base.cross_entropy_mean(logits, jnp.concatenate([labels, labels]), label_smoothing)
  pairing = jnp.mean(jnp.square(logits_clean.astype(jnp.float32) - logits_adv.astype(jnp.float32)))
  return xent + weight * pairing


def alp(model, config) -> base.Objective:
  """ALP objective; hyperparameters from ``config.objective.alp`` (see defaults)."""
  cfg = defaults.objective_config(config, "alp", DEFAULTS)
  if cfg.target not in TARGETS:
    raise ValueError(f"alp.target {cfg.target!r} is not one of {TARGETS}")
  attack = defaults.TrainingAttack(model, config, cfg)
  weight, smoothing, target_kind = float(cfg.weight), float(cfg.label_smoothing), cfg.target

  def generate(params, model_state, aux_state, batch, key, step):
    del aux_state
    images = batch["image"]
    k_target, k_attack = jax.random.split(key)
    clean = attack.logits_fn(params, model_state)(images)
    if target_kind == "random":
      target = jax.random.randint(k_target, batch["label"].shape, 0, clean.shape[-1])
    else:
      target = jnp.argmin(clean, -1) if target_kind == "least_likely" else jnp.argmax(clean, -1)
    target = jax.lax.stop_gradient(target)
    return attack(
      params,
      model_state,
      images,
      target,
      k_attack,
      loss="ce",
      targeted=target_kind != "untargeted",
      step=step,
    )

  def loss(params, model_state, aux_state, batch, adv, key, step):
    del step
    labels = batch["label"]
    both = jnp.concatenate([batch["image"], adv], axis=0)
    out = base.forward(
      model,
      params,
      model_state,
      both,
      mode="train",
      labels=jnp.concatenate([labels, labels]),
      taps=base.ALL_TAPS,
      rng=base.pass_key(key, 0),
    )
    logits_clean, logits_adv = jnp.split(out.logits, 2, axis=0)
    value = alp_loss(logits_clean, logits_adv, labels, weight=weight, label_smoothing=smoothing)
    metrics = {
      "accuracy": base.accuracy(logits_clean, labels),
      "adv_accuracy": base.accuracy(logits_adv, labels),
      "loss_pairing": jnp.mean(jnp.square(logits_clean - logits_adv)),
    }
    n = labels.shape[0]
    # One BN pass over [x; x']: its two halves are the "clean" and "adv" passes.
    passes = {"clean": base.slice_output(out, 0, n), "adv": base.slice_output(out, n, 2 * n)}
    return value, base.LossAux(out.model_state, aux_state, metrics, passes)

  return base.Objective(
    "alp",
    base.no_aux_state,
    generate,
    loss,
    base.BNPolicy(attack=attack.bn, update="clean+adversarial (one concatenated pass)"),
  )


objective = alp
