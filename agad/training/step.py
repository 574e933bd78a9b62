"""The compiled train and validation steps (one program each, no host round-trips)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from agad.attacks import iterative as pgd_lib
from agad.objectives import base
from agad.training.state import TrainState


def make_train_step(
  objective: base.Objective,
  tx: optax.GradientTransformation,
  *,
  ema_decay: float,
  schedule: optax.Schedule | None = None,
) -> Callable:
  """``(state, batch, frozen=None) -> (state, metrics)``: attack with ``generate``, then one update.

  ``frozen``: the objective's host-loaded inputs (``Objective.frozen``), seen by
  ``generate``/``loss`` as ``aux_state[FROZEN]`` and never stored in the state.
  """

  def train_step(state: TrainState, batch: dict, frozen: Any = None) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(state.key, state.step)
    k_gen, k_loss = jax.random.split(key)
    aux_in = state.aux_state if frozen is None else {**state.aux_state, base.FROZEN: frozen}
    adv = objective.generate(state.params, state.model_state, aux_in, batch, k_gen, state.step)
    adv = jax.tree.map(jax.lax.stop_gradient, adv)
    grad_fn = jax.value_and_grad(objective.loss, has_aux=True)
    (loss, aux), grads = grad_fn(
      state.params, state.model_state, aux_in, batch, adv, k_loss, state.step
    )
    model_state, metrics = aux.model_state, aux.metrics
    aux_state = aux.aux_state
    if frozen is not None:
      aux_state = {k: v for k, v in aux_state.items() if k != base.FROZEN}
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if ema_decay > 0:
      ema = jax.tree.map(
        lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params
      )
    else:
      ema = state.ema_params
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    if schedule is not None:
      metrics["lr"] = schedule(state.step)
    new_state = state.replace(
      step=state.step + 1,
      params=params,
      model_state=model_state,
      opt_state=opt_state,
      aux_state=aux_state,
      ema_params=ema,
    )
    return new_state, metrics

  return train_step


def make_eval_step(model, attack_cfg: Any, adaptive_loss: Callable | None = None) -> Callable:
  """``(params, model_state, batch, key) -> {'clean', 'robust_pgd', 'robust'}`` ([B] bool).

  Eval-mode BN (running statistics) for both the attack and the verdict; the
  attack is PGD from ``attack_cfg`` (eps, step_size, steps, norm, random_start),
  fully unrolled in the program. ``adaptive_loss``: an objective's adaptive-loss factory
  ``(model, variables) -> loss | {variant: loss}``; if given, PGD also maximises each
  variant and ``robust`` is correct under every attack (``robust_pgd``: under PGD-CE
  alone), so checkpoint choice is not fooled by a defense that masks CE gradients.
  Padded rows are reported with ``mask`` by the caller.
  """
  pgd_kw = dict(
    eps=attack_cfg.eps,
    step_size=attack_cfg.step_size,
    steps=attack_cfg.steps,
    norm=attack_cfg.norm,
    random_start=attack_cfg.random_start,
    driver="unroll",
  )

  def eval_step(params, model_state, batch, key):
    logits_fn = base.logits_fn_for(model, params, model_state, mode="eval")
    images, labels = batch["image"], batch["label"]
    correct = lambda x: jnp.argmax(logits_fn(x), -1) == labels
    clean = correct(images)
    robust_pgd = jnp.logical_and(
      clean, correct(pgd_lib.pgd(logits_fn, images, labels, key, **pgd_kw))
    )
    robust = robust_pgd
    if adaptive_loss is not None:
      variants = base.adaptive_variants(adaptive_loss(model, {"params": params, **model_state}))
      for i, name in enumerate(sorted(variants)):
        loss = variants[name]
        adv = pgd_lib.pgd_general(
          lambda x, loss=loss: loss(x, labels), images, jax.random.fold_in(key, i + 1), **pgd_kw
        )
        robust = jnp.logical_and(robust, correct(adv))
    return {"clean": clean, "robust_pgd": robust_pgd, "robust": robust}

  return eval_step


def tree_all_finite(tree: Any) -> jax.Array:
  leaves = [
    jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
