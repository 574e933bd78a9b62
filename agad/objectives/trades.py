"""TRADES (Zhang et al. 2019), as coded in yaodongyu/TRADES ``trades.py``.

    min  CE(f(x), y) + beta * (1/B) * sum_b KL(p(x_b) || p(x'_b))
    x' = argmax_{||x' - x||_inf <= eps} sum_b KL(p(x_b) || p(x'_b))

Attack: PGD on the summed KL from ``x + 0.001 N(0, 1)`` with the model in eval mode
(``model.eval()``), the clean prediction computed once (it does not change during the
attack). Loss: the model in train mode; ``KLDivLoss(size_average=False) / batch_size``
with gradients through *both* the clean and the adversarial distribution.

BatchNorm (``bn_policy``): attack on running statistics; the running statistics are
updated by the train-mode passes of the loss in the official order, ``trades.py`` calling
``model(x)`` (CE), then ``model(x_adv)`` and ``model(x)`` again (KL): three updates
``clean, adv, clean`` (config ``bn_updates``). The repeated clean pass gives identical
logits, so the gradient flows through the first clean and the first adversarial pass
and the extra pass only advances the running statistics (on stop-gradient parameters;
XLA merges its forward with the first one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from agad.objectives import base, defaults

# Fields and their comments stay aligned (the defaults are their own documentation).
# fmt: off
DEFAULTS = ml_collections.ConfigDict()
DEFAULTS.beta = 6.0                 # weight of (1/B) sum KL(p_clean || p_adv); official CIFAR-10: 6.
DEFAULTS.random_start = "normal"    # attack start x + 0.001 N(0, 1), as trades.py. None: config.attack.
DEFAULTS.attack_bn = "eval"         # BN mode inside the KL attack (model.eval() in trades.py). None: config.attack.bn.
# Train-mode forward passes, in order, each updating the BN running statistics.
# trades.py runs model(x) for CE, then model(x_adv) and model(x) again for the KL:
# "clean,adv,clean". The gradient always flows through exactly one clean and one
# adversarial pass (the repeated clean pass is numerically identical). TRADES-AWP's
# trainer uses "adv,clean,clean".
DEFAULTS.bn_updates = "clean,adv,clean"
# fmt: on


def kl_clean_adv(logits_clean: jax.Array, logits_adv: jax.Array) -> jax.Array:
  """Per-example ``KL(softmax(clean) || softmax(adv))`` ``[B]``, differentiable in both.

  PyTorch ``KLDivLoss(log_softmax(adv), softmax(clean))`` elementwise is
  ``p * (log p - log q)`` with 0 where ``p = 0``.
  """
  log_p = jax.nn.log_softmax(logits_clean.astype(jnp.float32), axis=-1)
  log_q = jax.nn.log_softmax(logits_adv.astype(jnp.float32), axis=-1)
  p = jnp.exp(log_p)
  return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def trades_loss(
  logits_clean: jax.Array, logits_adv: jax.Array, labels: jax.Array, *, beta: float
) -> jax.Array:
  """The scalar TRADES minimises: ``mean CE(clean, y) + beta * (1/B) sum KL(p_clean || p_adv)``.

  Stable public API (external checks call it). ``logits_* [B, K]``, ``labels [B]`` int.
  """
  batch_size = logits_clean.shape[0]
  natural = base.cross_entropy_mean(logits_clean, labels)
  robust = jnp.sum(kl_clean_adv(logits_clean, logits_adv)) / batch_size
  return natural + beta * robust


def train_passes(model, params, model_state, batch, adv, order: tuple[str, ...], key=None):
  """Train-mode passes over clean and adversarial images in ``order``, threading BN state.

  Returns ``(passes, model_state)``: ``passes = {"clean": ModelOutput, "adv": ModelOutput}``
  of the first pass of each kind (the ones differentiated; every tap recorded) and the
  running statistics after every pass. Pass ``i`` gets the plug-in key
  ``base.pass_key(key, i)`` (none when ``key`` is None).
  Later passes over the same images give identical logits and only advance the running
  statistics, as the repeated forward calls of the official PyTorch code do (their
  parameters are stop-gradient to make explicit that they are not differentiated).
  """
  images = {"clean": batch["image"], "adv": adv}
  passes = {}
  for i, kind in enumerate(order):
    first = kind not in passes
    p = params if first else jax.lax.stop_gradient(params)
    out = base.forward(
      model,
      p,
      model_state,
      images[kind],
      mode="train",
      labels=batch["label"],
      taps=base.ALL_TAPS if first else (),
      rng=None if key is None else base.pass_key(key, i),
    )
    model_state = out.model_state
    if first:
      passes[kind] = out
  return passes, model_state


def paired_objective(
  name: str, model, config, cfg_defaults, *, attack_loss: str, pair_loss
) -> base.Objective:
  """An objective on clean and adversarial logits of the same batch (TRADES, MART).

  ``pair_loss(logits_clean, logits_adv, labels, cfg) -> (value, extra_metrics)``; the
  attack maximises ``attack_loss`` through the objective's BN mode; the loss runs the
  train-mode passes in ``config.objective.<name>.bn_updates`` order.
  """
  cfg = defaults.objective_config(config, name, cfg_defaults)
  attack = defaults.TrainingAttack(model, config, cfg)
  order = defaults.bn_pass_order(cfg.bn_updates)

  def generate(params, model_state, aux_state, batch, key, step):
    del aux_state
    return attack(
      params, model_state, batch["image"], batch["label"], key, loss=attack_loss, step=step
    )

  def loss(params, model_state, aux_state, batch, adv, key, step):
    del step
    passes, model_state = train_passes(model, params, model_state, batch, adv, order, key)
    logits_clean, logits_adv = passes["clean"].logits, passes["adv"].logits
    value, extra = pair_loss(logits_clean, logits_adv, batch["label"], cfg)
    metrics = {
      "accuracy": base.accuracy(logits_clean, batch["label"]),
      "adv_accuracy": base.accuracy(logits_adv, batch["label"]),
      **extra,
    }
    return value, base.LossAux(model_state, aux_state, metrics, passes)

  return base.Objective(
    name,
    base.no_aux_state,
    generate,
    loss,
    base.BNPolicy(attack=attack.bn, update=f"{cfg.bn_updates} (train-mode passes)"),
  )


def trades(model, config) -> base.Objective:
  """TRADES objective; hyperparameters from ``config.objective.trades`` (see defaults)."""

  def pair_loss(logits_clean, logits_adv, labels, cfg):
    value = trades_loss(logits_clean, logits_adv, labels, beta=float(cfg.beta))
    return value, {
      "loss_natural": base.cross_entropy_mean(logits_clean, labels),
      "loss_robust": jnp.mean(kl_clean_adv(logits_clean, logits_adv)),
    }

  return paired_objective("trades", model, config, DEFAULTS, attack_loss="kl", pair_loss=pair_loss)


objective = trades
