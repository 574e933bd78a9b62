"""MART (Wang et al. 2020), as coded in YisenWang/MART ``mart.py``.

With ``p = softmax f(x)``, ``p' = softmax f(x')`` and ``y_hat = argmax_{j != y} p'_j``:

    loss = mean_b CE(f(x'_b), y_b) + mean_b -log(1.0001 - p'_{b, y_hat} + 1e-12)
           + beta * (1/B) * sum_b [sum_k p_{b,k} (log p_{b,k} - log(p'_{b,k} + 1e-12))]
                                  * (1.0000001 - p_{b, y_b})

Attack: PGD on mean CE from ``x + 0.001 N(0, 1)`` in eval mode (``mart.py``; the paper's
uniform start is not what the code does). Loss: train mode, ``model(x)`` then
``model(x_adv)``, each updating the BN running statistics (``bn_updates="clean,adv"``).
Gradients flow through the clean probabilities in both the KL and the ``(1 - p_y)``
weight, as in the official code (nothing is detached).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from agad.attacks import losses as attack_losses
from agad.objectives import base
from agad.objectives.trades import paired_objective

# Fields and their comments stay aligned (the defaults are their own documentation).
# fmt: off
DEFAULTS = ml_collections.ConfigDict()
DEFAULTS.beta = 6.0                 # weight of the misclassification-aware KL term; official: 6.
DEFAULTS.random_start = "normal"    # mart.py starts from x + 0.001 N(0, 1) (not uniform). None: config.attack.
DEFAULTS.attack_bn = "eval"         # CE attack under model.eval(). None: config.attack.bn.
DEFAULTS.bn_updates = "clean,adv"   # mart.py: model(x) then model(x_adv), both train mode.
# fmt: on


def mart_loss(
  logits_clean: jax.Array, logits_adv: jax.Array, labels: jax.Array, *, beta: float
) -> jax.Array:
  """The scalar MART minimises (``mart.py``, reductions and constants included).

  Stable public API (external checks call it). ``logits_* [B, K]``, ``labels [B]`` int.
  """
  logits_clean = logits_clean.astype(jnp.float32)
  logits_adv = logits_adv.astype(jnp.float32)
  batch_size = logits_adv.shape[0]
  adv_probs = jax.nn.softmax(logits_adv, axis=-1)
  # torch.argsort(adv_probs)[:, -2:]; new_y = second-largest if the largest is y. Entries are
  # picked by one-hot products (losses.pick), not gathers (tests/numerics_test.py).
  top2 = jnp.argsort(adv_probs, axis=-1)[:, -2:]
  new_y = jnp.where(top2[:, -1] == labels, top2[:, -2], top2[:, -1])
  boosted = -attack_losses.pick(jnp.log(1.0001 - adv_probs + 1e-12), new_y)
  loss_adv = base.cross_entropy_mean(logits_adv, labels) + jnp.mean(boosted)

  nat_probs = jax.nn.softmax(logits_clean, axis=-1)
  true_probs = attack_losses.pick(nat_probs, labels)
  # nn.KLDivLoss(reduction='none')(log(adv_probs + 1e-12), nat_probs):
  # target * (log target - input), 0 where target == 0.
  log_nat = jax.nn.log_softmax(logits_clean, axis=-1)
  kl = jnp.where(nat_probs > 0, nat_probs * (log_nat - jnp.log(adv_probs + 1e-12)), 0.0)
  loss_robust = (1.0 / batch_size) * jnp.sum(jnp.sum(kl, axis=1) * (1.0000001 - true_probs))
  return loss_adv + float(beta) * loss_robust


def mart(model, config) -> base.Objective:
  """MART objective; hyperparameters from ``config.objective.mart`` (see defaults)."""
  pair_loss = lambda lc, la, y, cfg: (mart_loss(lc, la, y, beta=float(cfg.beta)), {})
  return paired_objective("mart", model, config, DEFAULTS, attack_loss="ce", pair_loss=pair_loss)


objective = mart
