"""AFA's two objectives against independent recomputations: stage I's loss branch by
branch (each branch's own train-mode pass and the base's formula written out), stage II's
``generate`` (per-example strengths in [0, xi_max]; the attack differentiates through the
deployed fusion, weight generators included) and ``loss`` (CE only; one optimiser step
moves the ``wg/`` parameters and statistics only)."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from agad import defenses
from agad.defenses import afa
from agad.defenses._afa_norm import WeightGenerator
from agad.objectives import base
from agad.training import optim
from tests.defenses_afa_test import K, _model_and_vars
from tests.helpers import assert_close


def _ce(logits, y):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def _kl(logits_p, logits_q):
  p = jax.nn.softmax(logits_p)
  return (
    jnp.sum(p * (jax.nn.log_softmax(logits_p) - jax.nn.log_softmax(logits_q))) / logits_p.shape[0]
  )


@pytest.fixture(scope="module")
def stage_one():
  """One stage-I model (distinct branches) for every base: the base is an objective field."""
  return _model_and_vars()


@pytest.fixture(scope="module")
def stage_two():
  return _model_and_vars("afa_stage2", **{"init.workdir": "runs/none"})


def _with(config, **overrides):
  config = config.copy_and_resolve_references()
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  return config


@pytest.mark.parametrize("base_name,reduction", [("pgd_at", "sum"), ("trades", "mean")])
@pytest.mark.slow
def test_stage_one_loss_is_the_per_branch_terms_recomputed(stage_one, base_name, reduction):
  """Algorithm 1: CE(f_0(x), y) + sum_{k>=1} L_a(branch k on x'_k); "mean" divides by K.
  Every term is recomputed from its own train-mode pass routed to branch k (batch
  statistics, so the passes do not depend on each other's updates) and the base's formula
  written out here, not read from the loss's metrics."""
  config, net, params, ms, x, y = stage_one
  config = _with(
    config, **{"objective.afa.base": base_name, "objective.afa.loss_reduction": reduction}
  )
  batch = {"image": x, "label": y}
  objective = afa.afa_stage1(net, config)
  adv = jax.jit(objective.generate)(params, ms, {}, batch, jax.random.key(5), 0)
  b = x.shape[0]
  # Eager passes (a tiny model): one compile per branch would cost more than it saves.
  logits = lambda v, k: (
    base.forward(net, params, ms, v, mode="train", norm_ctx={"branch": k}).logits
  )
  terms = [_ce(logits(x, 0), y)]
  for k in range(1, K):
    adv_k = logits(adv[(k - 1) * b : k * b], k)
    if base_name == "pgd_at":
      terms.append(_ce(adv_k, y))
    else:  # TRADES inside branch k: CE(f_k(x), y) + 6 KL(f_k(x) || f_k(x'_k))
      clean_k = logits(x, k)
      terms.append(_ce(clean_k, y) + 6.0 * _kl(clean_k, adv_k))
  assert len({round(float(t), 4) for t in terms}) == K  # the branches really differ
  value, _ = jax.jit(objective.loss)(params, ms, {}, batch, adv, jax.random.key(6), 0)
  np.testing.assert_allclose(value, sum(terms) / (K if reduction == "mean" else 1), rtol=1e-5)
  config.objective.afa.loss_reduction = "avg"
  with pytest.raises(ValueError, match="loss_reduction='avg'"):
    afa.afa_stage1(net, config)


def _stage2(fixture, **kw):
  config, net, params, ms, _, _ = fixture
  config = _with(config, **kw)
  return config, net, params, ms, defenses.build_objective("afa_stage2", net, config)


def _batch(n, seed=0):
  x = 0.25 + 0.5 * jax.random.uniform(jax.random.key(seed), (n, 8, 8, 1))  # no [0, 1] clipping
  return {"image": x, "label": jnp.arange(n) % 10}


@pytest.mark.parametrize("eps_max", [1.0, 0.25])
def test_stage_two_strengths_vary_per_example_in_zero_to_xi_max(stage_two, eps_max):
  config, net, params, ms, objective = _stage2(
    stage_two, **{"objective.afa_stage2.eps_max": eps_max, "attack.steps": 3}
  )
  batch = _batch(32)
  adv = jax.jit(objective.generate)(params, ms, {}, batch, jax.random.key(7), 0)
  xi_max = eps_max * config.attack.eps
  d = np.abs(np.asarray(adv - batch["image"])).reshape(32, -1).max(-1)
  assert np.all(d <= xi_max + 1e-6), (d.max(), xi_max)
  # eps_i ~ U(0, xi_max), one per example: the radii spread over the range (with a uniform
  # start and 3 sign steps each example reaches its own radius on some pixel).
  assert len(np.unique(np.round(d / xi_max, 4))) >= 30
  assert d.min() < 0.2 * xi_max and d.max() > 0.8 * xi_max
  assert 0.3 < d.mean() / xi_max < 0.7


def _detach_weight_generators(next_fun, args, kwargs, context):
  out = next_fun(*args, **kwargs)
  if isinstance(context.module, WeightGenerator) and context.method_name == "__call__":
    return jax.lax.stop_gradient(out)
  return out


def test_stage_two_attack_differentiates_through_the_weight_generators(stage_two):
  """One sign step from x (no random start): its direction is the sign of the gradient of
  CE through the eval-mode deployed model with W0 = sigmoid(WG(x)) live, and differs from
  the gradient with every WG output detached (W0 held at its value)."""
  config, net, params, ms, objective = _stage2(
    stage_two, **{"attack.steps": 1, "objective.afa_stage2.random_start": "none"}
  )
  flat = traverse_util.flatten_dict(params, sep="/")
  for path in [p for p in flat if re.search(r"(^|/)wg/fc1/kernel$", p)]:
    flat[path] = 20.0 * flat[path]  # a weight generator that reacts to its input
  params = traverse_util.unflatten_dict(flat, sep="/")
  batch = _batch(8, seed=1)
  adv = jax.jit(objective.generate)(params, ms, {}, batch, jax.random.key(8), 0)

  def ce_sum(v):
    out = base.forward(net, params, ms, v, mode="eval", labels=batch["label"])
    return jnp.sum(-jnp.take_along_axis(jax.nn.log_softmax(out.logits), batch["label"][:, None], 1))

  g_live = jax.jit(jax.grad(ce_sum))(batch["image"])
  with nn.intercept_methods(_detach_weight_generators):
    g_detached = jax.jit(jax.grad(ce_sum))(batch["image"])
  rel = float(jnp.linalg.norm(g_live - g_detached) / jnp.linalg.norm(g_live))
  assert rel > 0.02, rel  # the WG path carries a share of the gradient
  moved = np.sign(np.asarray(adv - batch["image"]))
  live, detached = np.sign(np.asarray(g_live)), np.sign(np.asarray(g_detached))
  nonzero = live != 0
  np.testing.assert_array_equal(moved[nonzero], live[nonzero])
  # Where the two gradients point apart, the step follows the live one (a detached attack
  # would fail here).
  apart = nonzero & (live != detached)
  assert apart.sum() >= 3, apart.sum()
  np.testing.assert_array_equal(moved[apart], live[apart])


def test_stage_two_loss_is_ce_only_and_one_step_moves_the_weight_generators_only(stage_two):
  config, net, params, ms, objective = _stage2(stage_two)
  batch = _batch(8, seed=2)
  adv = jax.jit(objective.generate)(params, ms, {}, batch, jax.random.key(9), 0)
  loss = lambda p: objective.loss(p, ms, {}, batch, adv, jax.random.key(10), 0)
  (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  # CE of the train-mode deployed pass on x' (WG BNs on batch statistics), no other term.
  out = jax.jit(lambda v: base.forward(net, params, ms, v, mode="train", labels=batch["label"]))(
    adv
  )
  np.testing.assert_allclose(value, _ce(out.logits, batch["label"]), rtol=1e-5)
  # The frozen branches' statistics stay; the WGs' own BN statistics update.
  before = traverse_util.flatten_dict(ms["batch_stats"], sep="/")
  after = traverse_util.flatten_dict(aux.model_state["batch_stats"], sep="/")
  for path, v in before.items():
    if "/wg/" in path:
      assert not np.array_equal(after[path], v), path
    else:
      np.testing.assert_array_equal(after[path], v, err_msg=path)
  # One SGD step with the recipe's freeze (init.freeze): wg/ parameters move, nothing else.
  tx, _ = optim.make_optimizer(config.optim, 10, 1, frozen=[config.init.freeze], params=params)
  updates, _ = tx.update(grads, tx.init(params), params)
  stepped = traverse_util.flatten_dict(jax.tree.map(lambda p, u: p + u, params, updates), sep="/")
  flat, g = traverse_util.flatten_dict(params, sep="/"), traverse_util.flatten_dict(grads, sep="/")
  wg = [p for p in flat if re.search(r"(^|/)wg/", p)]
  assert wg and len(wg) < len(flat)
  for path, v in flat.items():
    if path in wg:
      assert not np.array_equal(stepped[path], v), path
    else:
      np.testing.assert_array_equal(stepped[path], v, err_msg=path)
  # The loss does reach the backbone (only the freeze keeps it still).
  assert any(float(jnp.max(jnp.abs(g[p]))) > 0 for p in flat if p not in wg)
  assert_close(aux.passes["adv"].logits, out.logits)
