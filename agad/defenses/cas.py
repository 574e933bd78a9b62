"""Channel-wise activation suppressing (Bai et al. ICLR 2021), as coded in
bymavis/CAS_ICLR2021 (``Standard_Adv_Training/models/resnet_cas.py``, ``train.py``,
``attack/reg_attack.py``). The parent of AGAIN and FSR.

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
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from agad.attacks import losses as attack_losses
from agad.defenses import _registry
from agad.models.layers import torch_linear_uniform
from agad.objectives import base, defaults

AUX_NAME = "cas_logits"

# CAS (Bai et al. ICLR 2021; bymavis/CAS_ICLR2021 Standard_Adv_Training).
DEFAULTS = ml_collections.ConfigDict()
DEFAULTS.weight = 2.0                  # --beta: CE(f(x'), y) + weight * mean_k CE(aux_k(x'), y); official 2.
# Plug-in sites (one aux head each). Official ResNet-18 puts CAS after each of the two
# units of layer4 (("stage4.unit0", "stage4.unit1") here); agad's default is the final
# feature map only. "stage4.unit[-1]" names the last unit of a stage for any depth.
DEFAULTS.sites = ("features",)
DEFAULTS.random_start = "uniform"      # reg_attack.py: random_start=True, U(-eps, eps). None: config.attack.
DEFAULTS.attack_bn = "eval"            # attack with model(x, _eval=True): running stats, predicted-label masks.


class CASPlugin(nn.Module):
  """``plugin(features, *, train, labels) -> features`` for a ``[B, H, W, C]`` or ``[B, C]`` site.

  With ``train`` and labels given, the mask is ``W[labels]``; otherwise (eval mode, or no
  labels) ``W[argmax aux_logits]``. ``W`` is the ``[K, C]`` weight (stored as the
  ``[C, K]`` kernel). ``straight_through`` (adaptive attacks only, BPDA): the forward value
  is unchanged, the predicted-label mask's gradient is that of the soft mask
  ``softmax(aux_logits) @ W``, so an attacker also sees how the prediction would move it.
  """
  num_classes: int
  straight_through: bool = False
  st_temperature: float = 1.0  # the soft mask is softmax(aux_logits / T) @ W

  # Fields an adaptive attack may switch (``_registry.with_plugin_overrides``).
  ADAPTIVE_FIELDS = ("straight_through", "st_temperature")

  @nn.compact
  def __call__(self, features: jax.Array, *, train: bool, labels: jax.Array | None = None) -> jax.Array:
    channels = features.shape[-1]
    init = torch_linear_uniform(channels)
    kernel = self.param("kernel", init, (channels, self.num_classes), jnp.float32)
    bias = self.param("bias", init, (self.num_classes,), jnp.float32)
    pooled = jnp.mean(features.astype(jnp.float32), axis=tuple(range(1, features.ndim - 1)))
    logits = pooled @ kernel + bias
    self.sow("aux", AUX_NAME, logits)
    if train and labels is not None:
      index = labels
    else:
      index = jnp.argmax(logits, axis=-1)
    mask = attack_losses.rows(kernel.T, index)  # [B, C]: W[index] (no gather: losses.rows)
    if self.straight_through and not (train and labels is not None):
      mask = straight_through_mask(mask, logits, kernel, self.st_temperature)
    mask = mask.reshape((mask.shape[0],) + (1,) * (features.ndim - 2) + (channels,))
    return features * mask.astype(features.dtype)


def straight_through_mask(mask: jax.Array, logits: jax.Array, kernel: jax.Array,
                          temperature: float = 1.0) -> jax.Array:
  """``mask [B, C]``'s value with the gradient of ``softmax(logits / T) @ W`` (BPDA).

  At T = 1 a confident head's softmax is nearly one-hot and passes almost no gradient; a
  larger T softens it (the ``st_t10`` adaptive variant)."""
  soft = jax.nn.softmax(logits / temperature, axis=-1) @ kernel.T  # [B, C]
  return mask + soft - jax.lax.stop_gradient(soft)


def aux_logits(aux: dict, name: str = AUX_NAME) -> list[jax.Array]:
  """All arrays sown under ``name`` anywhere in an ``aux`` collection (sorted by path)."""
  found = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(aux)[0]:
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if name in keys:
      found.append((jax.tree_util.keystr(path), leaf))
  return [leaf.astype(jnp.float32) for _, leaf in sorted(found, key=lambda t: t[0])]


def per_example_fn(defense: str, aux_name: str) -> Callable:
  """``(logits, aux, labels, weight) -> [B]`` = ``CE(f(x), y) + weight * mean_k CE(aux_k(x), y)``
  over the heads sown as ``aux_name`` (``k`` over sites) of a CAS-family defense."""

  def per_example(logits: jax.Array, aux: dict, labels: jax.Array, weight: float) -> jax.Array:
    heads = aux_logits(aux, aux_name)
    if not heads:
      raise ValueError(f"the {defense} objective found no '{aux_name}' in the model's 'aux' collection: "
                       "build the model with agad.defenses.build_model(config, info) (or "
                       "plugins=agad.defenses.plugins_for(spec, config, num_classes))")
    main = attack_losses.cross_entropy(logits, labels)
    extra = sum(attack_losses.cross_entropy(h, labels) for h in heads) / len(heads)
    return main + weight * extra

  return per_example


cas_per_example = per_example_fn("CAS", AUX_NAME)


def _without_aux(model_state):
  """``model_state`` without the ``aux`` collection (sown afresh by every pass)."""
  return {k: v for k, v in model_state.items() if k != "aux"}


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

  return base.Objective("cas", base.no_aux_state, generate,
                        adversarial_loss(model, cas_per_example, AUX_NAME, weight),
                        base.BNPolicy(attack=attack.bn, update="adversarial"), _adaptive(weight))


def adversarial_loss(model, per_example: Callable, aux_name: str, weight: float) -> Callable:
  """A CAS-family objective's ``loss``: one train-mode pass on the adversarial batch
  (plug-in rng ``pass_key(key, 0)``), mean ``per_example``, main and aux accuracies."""

  def loss(params, model_state, aux_state, batch, adv, key, step):
    del step
    labels = batch["label"]
    out = base.forward(model, params, _without_aux(model_state), adv, mode="train", labels=labels,
                       taps=base.ALL_TAPS, rng=base.pass_key(key, 0))
    value = jnp.mean(per_example(out.logits, out.aux, labels, weight))
    heads = aux_logits(out.aux, aux_name)
    metrics = {"adv_accuracy": base.accuracy(out.logits, labels),
               "aux_accuracy": sum(base.accuracy(h, labels) for h in heads) / len(heads)}
    return value, base.LossAux({**model_state, **out.model_state}, aux_state, metrics, {"adv": out})

  return loss


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


def heads_transform(inner: base.Objective, name: str, aux_name: str, weight: float,
                    adaptive_loss: Callable) -> base.Objective:
  """``<inner>+<name>`` of a CAS-family defense: ``inner``'s loss + ``weight * mean_k
  CE(aux_k(x'), y)`` over the heads sown as ``aux_name`` in its ``"adv"`` pass (metric
  ``<name>_aux_accuracy``), ``inner``'s attack, the family's adaptive losses."""

  def terms(params, passes, batch, key, step):
    del params, key, step
    if "adv" not in passes:
      raise ValueError(f"+{name} needs an inner objective with an 'adv' pass; {inner.name} has {sorted(passes)}")
    heads = aux_logits(passes["adv"].aux, aux_name)
    if not heads:
      raise ValueError(f"+{name} found no '{aux_name}' in the adversarial pass of {inner.name}: "
                       "build the model with agad.defenses.build_model(config, info)")
    labels = batch["label"]
    extra = sum(attack_losses.cross_entropy(h, labels) for h in heads) / len(heads)
    return weight * jnp.mean(extra), {f"{name}_aux_accuracy": sum(base.accuracy(h, labels) for h in heads) / len(heads)}

  combined = base.add_terms(inner, name, terms)
  return combined._replace(adaptive_loss=adaptive_loss)


def combined_loss(net, params, model_state, labels, mode: str, weight: float):
  """``x -> [B]``: the per-example CAS loss through ``net`` in BN ``mode`` (what the
  official attack and the adaptive attacks maximise)."""
  model_state = _without_aux(model_state)

  def fn(x):
    out = base.forward(net, params, model_state, x, mode=mode, labels=labels)
    return cas_per_example(out.logits, out.aux, labels, weight)

  return fn


# Adaptive variants of the CAS family (CAS, AGAIN): name -> straight-through temperature
# (None: the hard predicted-label masks the deployed model uses).
ADAPTIVE_VARIANTS = {"": None, "st": 1.0, "st_t10": 10.0}


def adaptive_factory(per_example: Callable, weight: float):
  """``Objective.adaptive_loss`` of a CAS-family defense: every variant of
  ``ADAPTIVE_VARIANTS`` maximises ``per_example(logits, aux, labels, weight)`` (the
  combined main + aux loss) through the eval-mode model; ``""`` with the hard masks, the
  others with the same value and mask gradients by straight-through softmax at their
  temperature (BPDA)."""

  def adaptive_loss(net, variables):
    params = variables["params"]
    model_state = _without_aux({k: v for k, v in variables.items() if k != "params"})

    def combined(temperature):
      n = net if temperature is None else _registry.with_plugin_overrides(
          net, straight_through=True, st_temperature=temperature)

      def fn(x, labels):
        out = base.forward(n, params, model_state, x, mode="eval", labels=labels)
        return per_example(out.logits, out.aux, labels, weight)
      return fn

    return {name: combined(t) for name, t in ADAPTIVE_VARIANTS.items()}

  return adaptive_loss


def _adaptive(weight: float):
  """CAS's adaptive losses: :func:`adaptive_factory` on :func:`cas_per_example`."""
  return adaptive_factory(cas_per_example, weight)


def objective(model, config) -> base.Objective:
  """The standalone ``cas`` objective of the config grammar (the defense contract)."""
  return cas(model, config)
