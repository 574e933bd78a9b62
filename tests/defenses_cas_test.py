"""CAS: plug-in masks (true label in training, prediction at test), aux term, attack, adaptive loss."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from agad import models
from agad.attacks import losses as attack_losses
from agad.objectives import base
from agad.defenses.cas import AUX_NAME, CASPlugin, aux_logits, cas
from tests.helpers import assert_close, objective_defaults
from agad.defenses import plugins_for

K = 10
B, H, W, C = 4, 8, 8, 1


def test_plugin_masks_with_weight_row_of_label_or_prediction():
  feats = jax.random.normal(jax.random.key(0), (3, 2, 2, 5))
  plugin = CASPlugin(num_classes=4)
  variables = plugin.init(jax.random.key(1), feats, train=False)
  kernel, bias = variables["params"]["kernel"], variables["params"]["bias"]
  assert kernel.shape == (5, 4)
  assert float(jnp.abs(kernel).max()) <= 1 / np.sqrt(5)  # PyTorch Linear init bound
  logits = feats.mean(axis=(1, 2)) @ kernel + bias
  pred = jnp.argmax(logits, -1)
  labels = (pred + 1) % 4  # never the prediction
  out_train, col = plugin.apply(variables, feats, train=True, labels=labels, mutable=["aux"])
  np.testing.assert_allclose(out_train, feats * kernel.T[labels][:, None, None, :], rtol=1e-6)
  np.testing.assert_allclose(col["aux"][AUX_NAME][0], logits, rtol=1e-5)
  out_eval, _ = plugin.apply(variables, feats, train=False, labels=labels, mutable=["aux"])
  np.testing.assert_allclose(out_eval, feats * kernel.T[pred][:, None, None, :], rtol=1e-6)
  assert not np.allclose(out_train, out_eval)
  # A pooled [B, C] site works too.
  out_vec, _ = plugin.apply(
    variables, feats.mean(axis=(1, 2)), train=True, labels=labels, mutable=["aux"]
  )
  np.testing.assert_allclose(out_vec, feats.mean(axis=(1, 2)) * kernel.T[labels], rtol=1e-6)


def make_config(sites=("features",)):
  c = ml_collections.ConfigDict()
  c.objective = objective_defaults()
  c.objective.cas.sites = sites
  c.attack = ml_collections.ConfigDict(
    dict(
      eps=0.1,
      step_size=0.05,
      steps=2,
      norm="linf",
      random_start="uniform",
      bn="eval",
      driver="unroll",
    )
  )
  return c


@pytest.fixture(scope="module")
def setup():
  cfg = make_config()
  plugins = plugins_for("cas+awp", cfg, K)
  assert list(plugins) == ["features"]
  model = models.build_model("tiny_bn", num_classes=K, mean=(0.5,), std=(0.25,), plugins=plugins)
  x = jax.random.uniform(jax.random.key(0), (B, H, W, C))
  y = jnp.array([0, 1, 2, 3])
  variables = model.init(jax.random.key(1), x, train=False, labels=y)
  assert "plugin_features" in variables["params"]
  state = {"batch_stats": variables["batch_stats"]}
  return cfg, model, variables["params"], state, {"image": x, "label": y}


def _apply(model, params, state, x, *, train, labels):
  mutable = ["aux", "batch_stats"] if train else ["aux"]
  logits, col = model.apply(
    {"params": params, **state}, x, train=train, labels=labels, mutable=mutable
  )
  (aux,) = [leaf for leaf in jax.tree.leaves(col["aux"])]
  return logits, aux


def test_straight_through_mask_keeps_value_and_adds_the_soft_mask_gradient():
  feats = jax.random.normal(jax.random.key(0), (3, 2, 2, 5))
  r = jax.random.normal(jax.random.key(2), (3, 2, 2, 5))
  hard_plugin, st_plugin = CASPlugin(num_classes=4), CASPlugin(num_classes=4, straight_through=True)
  variables = hard_plugin.init(jax.random.key(1), feats, train=False)
  kernel, bias = variables["params"]["kernel"], variables["params"]["bias"]
  f = lambda p, z: jnp.sum(p.apply(variables, z, train=False, mutable=["aux"])[0] * r)
  np.testing.assert_allclose(f(st_plugin, feats), f(hard_plugin, feats), rtol=1e-6)

  def soft_path(z):  # d/dz of sum(sg(z) * softmax(aux(z)) @ W * r): the extra BPDA term
    soft = jax.nn.softmax(z.mean(axis=(1, 2)) @ kernel + bias, -1) @ kernel.T
    return jnp.sum(jax.lax.stop_gradient(z) * soft[:, None, None, :] * r)

  expected = jax.grad(lambda z: f(hard_plugin, z))(feats) + jax.grad(soft_path)(feats)
  np.testing.assert_allclose(
    jax.grad(lambda z: f(st_plugin, z))(feats), expected, rtol=1e-5, atol=1e-6
  )
  # A softer temperature: the same value, the gradient of softmax(z / T) @ W instead.
  t10 = CASPlugin(num_classes=4, straight_through=True, st_temperature=10.0)
  np.testing.assert_allclose(f(t10, feats), f(hard_plugin, feats), rtol=1e-6)

  def soft_path_t10(z):
    soft = jax.nn.softmax((z.mean(axis=(1, 2)) @ kernel + bias) / 10.0, -1) @ kernel.T
    return jnp.sum(jax.lax.stop_gradient(z) * soft[:, None, None, :] * r)

  expected_t10 = jax.grad(lambda z: f(hard_plugin, z))(feats) + jax.grad(soft_path_t10)(feats)
  np.testing.assert_allclose(
    jax.grad(lambda z: f(t10, z))(feats), expected_t10, rtol=1e-5, atol=1e-6
  )
  assert not np.allclose(expected_t10, expected, atol=1e-6)
  # Training with labels is unaffected by the flag.
  labels = jnp.array([0, 1, 2])
  out_t = st_plugin.apply(variables, feats, train=True, labels=labels, mutable=["aux"])[0]
  np.testing.assert_allclose(out_t, feats * kernel.T[labels][:, None, None, :], rtol=1e-6)


def test_train_masks_follow_labels_eval_masks_follow_prediction(setup):
  _, model, params, state, batch = setup
  x, y = batch["image"], batch["label"]
  other = (y + 3) % K
  t1, _ = _apply(model, params, state, x, train=True, labels=y)
  t2, _ = _apply(model, params, state, x, train=True, labels=other)
  assert not np.allclose(t1, t2)
  e1, _ = _apply(model, params, state, x, train=False, labels=y)
  e2, _ = _apply(model, params, state, x, train=False, labels=other)
  np.testing.assert_allclose(e1, e2)


def test_cas_loss_is_ce_plus_two_mean_aux_ce(setup):
  cfg, model, params, state, batch = setup
  obj = cas(model, cfg)
  adv = obj.generate(params, state, {}, batch, jax.random.key(2), 0)
  assert float(jnp.abs(adv - batch["image"]).max()) <= 0.1 + 1e-6
  value, (new_state, _, metrics, _) = obj.loss(params, state, {}, batch, adv, jax.random.key(3), 0)
  logits, aux = _apply(model, params, state, adv, train=True, labels=batch["label"])
  y = batch["label"]
  expected = jnp.mean(attack_losses.cross_entropy(logits, y)) + 2.0 * jnp.mean(
    attack_losses.cross_entropy(aux, y)
  )
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  ref = base.forward(model, params, state, adv, mode="train", labels=y)
  assert_close(new_state, ref.model_state)  # two programs: float32 tolerances
  assert set(metrics) >= {"adv_accuracy", "aux_accuracy"}


def test_attack_and_adaptive_loss_use_eval_mode_combined_loss(setup):
  cfg, model, params, state, batch = setup
  obj = cas(model, cfg)
  x, y = batch["image"], batch["label"]
  variants = obj.adaptive_loss(model, {"params": params, **state})
  assert set(variants) == {"", "st", "st_t10"}
  fn = variants[""]
  logits, aux = _apply(model, params, state, x, train=False, labels=y)
  expected = attack_losses.cross_entropy(logits, y) + 2.0 * attack_losses.cross_entropy(aux, y)
  np.testing.assert_allclose(fn(x, y), expected, rtol=1e-5)
  # The straight-through variant has the same value but a different input gradient.
  np.testing.assert_allclose(variants["st"](x, y), expected, rtol=1e-5)
  g_hard = jax.grad(lambda z: jnp.sum(fn(z, y)))(x)
  g_st = jax.grad(lambda z: jnp.sum(variants["st"](z, y)))(x)
  assert not np.allclose(g_hard, g_st, atol=1e-7)
  np.testing.assert_allclose(variants["st_t10"](x, y), expected, rtol=1e-5)
  g_t10 = jax.grad(lambda z: jnp.sum(variants["st_t10"](z, y)))(x)
  assert not np.allclose(g_t10, g_st, atol=1e-7)
  assert fn(x, y).shape == (B,)
  adv = obj.generate(params, state, {}, batch, jax.random.key(4), 0)
  assert float(jnp.sum(fn(adv, y))) > float(jnp.sum(fn(x, y)))  # the attack ascends it
  assert obj.bn_policy.attack == "eval"


def test_two_sites_average_heads_and_missing_plugins_is_an_error(setup):
  cfg, _, _, _, batch = setup
  cfg2 = make_config(sites=("stem", "features"))
  model = models.build_model(
    "tiny_bn", num_classes=K, mean=(0.5,), std=(0.25,), plugins=plugins_for("cas", cfg2, K)
  )
  variables = model.init(jax.random.key(1), batch["image"], train=False)
  params, state = variables["params"], {"batch_stats": variables["batch_stats"]}
  value, _ = cas(model, cfg2).loss(params, state, {}, batch, batch["image"], jax.random.key(0), 0)
  out = base.forward(model, params, state, batch["image"], mode="train", labels=batch["label"])
  heads = aux_logits(out.aux)
  assert len(heads) == 2
  y = batch["label"]
  expected = jnp.mean(attack_losses.cross_entropy(out.logits, y)) + 2.0 * 0.5 * sum(
    jnp.mean(attack_losses.cross_entropy(h, y)) for h in heads
  )
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  bare = models.build_model("tiny_bn", num_classes=K, mean=(0.5,), std=(0.25,))
  bv = bare.init(jax.random.key(1), batch["image"], train=False)
  with pytest.raises(ValueError, match="plugins_for"):
    cas(bare, cfg).loss(
      bv["params"],
      {"batch_stats": bv["batch_stats"]},
      {},
      batch,
      batch["image"],
      jax.random.key(0),
      0,
    )
