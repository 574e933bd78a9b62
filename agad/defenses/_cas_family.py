"""The CAS family's shared parts: a linear head on the pooled features of a plug-in site
whose weight row masks those features channel-wise (CAS, :mod:`agad.defenses.cas`), and the
losses, transform and adaptive attacks built on such heads (CAS, AGAIN, and FSR's
``aux_logits``).

A family member sows its heads' logits into the ``aux`` collection under its own name and
passes that name and its per-example loss (:func:`per_example_fn`) to
:func:`adversarial_loss`, :func:`heads_transform` and :func:`adaptive_factory`.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from agad.attacks import losses as attack_losses
from agad.defenses import _registry as registry
from agad.models.layers import torch_linear_uniform
from agad.objectives import base

CAS_LOGITS = "cas_logits"  # where CASPlugin sows its head's logits


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

  # Fields an adaptive attack may switch (``agad.defenses.with_plugin_overrides``).
  ADAPTIVE_FIELDS = ("straight_through", "st_temperature")

  @nn.compact
  def __call__(
    self, features: jax.Array, *, train: bool, labels: jax.Array | None = None
  ) -> jax.Array:
    channels = features.shape[-1]
    init = torch_linear_uniform(channels)
    kernel = self.param("kernel", init, (channels, self.num_classes), jnp.float32)
    bias = self.param("bias", init, (self.num_classes,), jnp.float32)
    pooled = jnp.mean(features.astype(jnp.float32), axis=tuple(range(1, features.ndim - 1)))
    logits = pooled @ kernel + bias
    self.sow("aux", CAS_LOGITS, logits)
    if train and labels is not None:
      index = labels
    else:
      index = jnp.argmax(logits, axis=-1)
    mask = attack_losses.rows(kernel.T, index)  # [B, C]: W[index] (no gather: losses.rows)
    if self.straight_through and not (train and labels is not None):
      mask = straight_through_mask(mask, logits, kernel, self.st_temperature)
    mask = mask.reshape((mask.shape[0],) + (1,) * (features.ndim - 2) + (channels,))
    return features * mask.astype(features.dtype)


def straight_through_mask(
  mask: jax.Array, logits: jax.Array, kernel: jax.Array, temperature: float = 1.0
) -> jax.Array:
  """``mask [B, C]``'s value with the gradient of ``softmax(logits / T) @ W`` (BPDA).

  At T = 1 a confident head's softmax is nearly one-hot and passes almost no gradient; a
  larger T softens it (the ``st_t10`` adaptive variant)."""
  soft = jax.nn.softmax(logits / temperature, axis=-1) @ kernel.T  # [B, C]
  return mask + soft - jax.lax.stop_gradient(soft)


def aux_logits(aux: dict, name: str = CAS_LOGITS) -> list[jax.Array]:
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
      raise ValueError(
        f"the {defense} objective found no '{aux_name}' in the model's 'aux' collection: "
        "build the model with agad.defenses.build_model(config, info) (or "
        "plugins=agad.defenses.plugins_for(spec, config, num_classes))"
      )
    main = attack_losses.cross_entropy(logits, labels)
    extra = sum(attack_losses.cross_entropy(h, labels) for h in heads) / len(heads)
    return main + weight * extra

  return per_example


def without_aux(model_state):
  """``model_state`` without the ``aux`` collection (sown afresh by every pass)."""
  return {k: v for k, v in model_state.items() if k != "aux"}


def adversarial_loss(model, per_example: Callable, aux_name: str, weight: float) -> Callable:
  """A CAS-family objective's ``loss``: one train-mode pass on the adversarial batch
  (plug-in rng ``pass_key(key, 0)``), mean ``per_example``, main and aux accuracies."""

  def loss(params, model_state, aux_state, batch, adv, key, step):
    del step
    labels = batch["label"]
    out = base.forward(
      model,
      params,
      without_aux(model_state),
      adv,
      mode="train",
      labels=labels,
      taps=base.ALL_TAPS,
      rng=base.pass_key(key, 0),
    )
    value = jnp.mean(per_example(out.logits, out.aux, labels, weight))
    heads = aux_logits(out.aux, aux_name)
    metrics = {
      "adv_accuracy": base.accuracy(out.logits, labels),
      "aux_accuracy": sum(base.accuracy(h, labels) for h in heads) / len(heads),
    }
    return value, base.LossAux({**model_state, **out.model_state}, aux_state, metrics, {"adv": out})

  return loss


def heads_transform(
  inner: base.Objective, name: str, aux_name: str, weight: float, adaptive_loss: Callable
) -> base.Objective:
  """``<inner>+<name>`` of a CAS-family defense: ``inner``'s loss + ``weight * mean_k
  CE(aux_k(x'), y)`` over the heads sown as ``aux_name`` in its ``"adv"`` pass (metric
  ``<name>_aux_accuracy``), ``inner``'s attack, the family's adaptive losses."""

  def terms(params, passes, batch, key, step):
    del params, key, step
    if "adv" not in passes:
      raise ValueError(
        f"+{name} needs an inner objective with an 'adv' pass; {inner.name} has {sorted(passes)}"
      )
    heads = aux_logits(passes["adv"].aux, aux_name)
    if not heads:
      raise ValueError(
        f"+{name} found no '{aux_name}' in the adversarial pass of {inner.name}: "
        "build the model with agad.defenses.build_model(config, info)"
      )
    labels = batch["label"]
    extra = sum(attack_losses.cross_entropy(h, labels) for h in heads) / len(heads)
    return weight * jnp.mean(extra), {
      f"{name}_aux_accuracy": sum(base.accuracy(h, labels) for h in heads) / len(heads)
    }

  combined = base.add_terms(inner, name, terms)
  return combined._replace(adaptive_loss=adaptive_loss)


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
    model_state = without_aux({k: v for k, v in variables.items() if k != "params"})

    def combined(temperature):
      n = (
        net
        if temperature is None
        else registry.with_plugin_overrides(net, straight_through=True, st_temperature=temperature)
      )

      def fn(x, labels):
        out = base.forward(n, params, model_state, x, mode="eval", labels=labels)
        return per_example(out.logits, out.aux, labels, weight)

      return fn

    return {name: combined(t) for name, t in ADAPTIVE_VARIANTS.items()}

  return adaptive_loss
