"""Tests for agad.models: parameter counts, shapes, BN modes, plug-ins, norm routing, taps.

Big networks are only traced abstractly (jax.eval_shape); real forwards run on tiny_bn,
a WRN-10-1 and SmallCNN with 8x8 / 28x28 inputs.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest, parameterized
from flax.core import FrozenDict

from agad.models import (
  MODEL_NAMES,
  MultiBranchBatchNorm,
  WideResNet,
  build_model,
  find_tap,
  max_pool_2x2,
)
from tests.helpers import assert_max_gradient_jitted_equals_eager

RGB = dict(num_classes=10, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
PARAMS = {
  "smallcnn": 312_202,
  "smallcnn_bn": 312_586,
  "resnet18": 11_173_962,
  "resnet34": 21_282_122,
  "resnet50": 23_520_842,
  "preact_resnet18": 11_172_170,
  "wrn34_10": 46_160_474,
  "wrn28_10": 36_479_194,
  "wrn16_8": 10_961_370,
  "vgg16": 15_253_578,
  "tiny_bn": 1_506,
}


def n_params(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def abstract_init(model, shape):
  """(logits, variables incl. intermediates) as ShapeDtypeStructs; no compute."""
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(
    lambda x: model.init_with_output(jax.random.key(0), x, train=False, mutable=True), x
  )


def smallcnn_formula(size, channels, classes=10):
  """Hand count: four 3x3 valid convs with bias, two pools, 200-200-classes MLP."""
  convs = [(channels, 32), (32, 32), (32, 64), (64, 64)]
  side = ((size - 4) // 2 - 4) // 2
  dense = [(64 * side * side, 200), (200, 200), (200, classes)]
  return sum(9 * i * o + o for i, o in convs) + sum(i * o + o for i, o in dense)


class LabelMask(nn.Module):
  """CAS-style plug-in: aux head on GAP; masks channels by W[labels] (train) or W[argmax] (eval)."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x, *, train, labels):
    w = self.param("w", nn.initializers.normal(1.0), (self.num_classes, x.shape[-1]))
    aux = x.mean(axis=(1, 2)) @ w.T
    self.sow("aux", "logits", aux)
    idx = labels if train else jnp.argmax(aux, -1)
    return x * w[idx][:, None, None, :]


class Zero(nn.Module):
  @nn.compact
  def __call__(self, x, *, train, labels):
    return jnp.zeros_like(x)


class ArchitectureTest(parameterized.TestCase):
  @parameterized.parameters(*MODEL_NAMES)
  def test_counts_shapes_and_taps(self, name):
    gray = name.startswith("smallcnn")
    shape = (2, 28, 28, 1) if gray else (2, 32, 32, 3)
    stats = dict(mean=(0.5,), std=(0.25,)) if gray else {}
    model = build_model(name, **{**RGB, **stats})
    logits, v = abstract_init(model, shape)
    self.assertEqual((logits.shape, logits.dtype), ((2, 10), jnp.float32))
    self.assertEqual(n_params(v["params"]), PARAMS[name])
    self.assertTrue(all(a.dtype == jnp.float32 for a in jax.tree.leaves(v["params"])))
    inter = v["intermediates"]
    stages = len(model.stage_sizes)
    for tap in ["stem", "features", "embedding"] + [f"stage{s}" for s in range(1, stages + 1)]:
      self.assertIn(tap, inter)
      self.assertIn(tap, v["perturbations"])
    for s, n in enumerate(model.stage_sizes, start=1):
      if name in ("smallcnn", "smallcnn_bn", "vgg16"):  # plain stages: n conv layers
        self.assertIn(f"stage{s}.pre_pool", inter)
        continue
      for i in range(n):
        find_tap(inter, f"stage{s}.unit{i}.branch")
        self.assertIn(f"stage{s}.unit{i}", inter)  # unit outputs are top-level sites
        self.assertIn(f"stage{s}.unit{i}", v["perturbations"])

  def test_tap_shapes_of_defense_sites(self):
    _, v = abstract_init(build_model("wrn34_10", **RGB), (2, 32, 32, 3))
    # AGAIN's two sites: last unit of stage 3 (after its BN-ReLU) and the final features.
    self.assertEqual(
      v["intermediates"]["stage3_unit4"]["stage3.unit4.branch"][0].shape, (2, 8, 8, 640)
    )
    self.assertEqual(v["intermediates"]["features"][0].shape, (2, 8, 8, 640))
    _, v = abstract_init(build_model("vgg16", **RGB), (2, 32, 32, 3))
    self.assertEqual(v["intermediates"]["stage4"][0].shape, (2, 4, 4, 512))  # before pool 4
    _, v = abstract_init(build_model("resnet50", **RGB), (2, 32, 32, 3))
    self.assertEqual(v["intermediates"]["features"][0].shape, (2, 4, 4, 2048))
    self.assertEqual(find_tap(v["intermediates"], "stage2.unit0.branch")[0].shape, (2, 16, 16, 512))

  def test_smallcnn_hand_count_and_forward(self):
    self.assertEqual(smallcnn_formula(28, 1), PARAMS["smallcnn"])
    cifar = build_model("smallcnn", **RGB)
    self.assertEqual(
      n_params(abstract_init(cifar, (1, 32, 32, 3))[1]["params"]), smallcnn_formula(32, 3)
    )
    model = build_model("smallcnn", num_classes=10, mean=(0.13,), std=(0.31,))
    x = jax.random.uniform(jax.random.key(1), (2, 28, 28, 1))
    v = model.init(jax.random.key(0), x, train=False)
    logits, state = model.apply(v, x, train=False, mutable=["intermediates"])
    chex.assert_shape(logits, (2, 10))
    chex.assert_tree_all_finite(logits)
    taps = state["intermediates"]
    chex.assert_shape(
      [taps["stage1"][0], taps["stage2"][0], taps["embedding"][0]],
      [(2, 12, 12, 32), (2, 4, 4, 64), (2, 200)],
    )

  def test_smallcnn_init_is_trades_reference(self):
    # TRADES' small_cnn.py: kaiming_normal_ convs with zero bias, nn.Linear defaults for fc1/fc2
    # (kernel and bias U(+-1/sqrt(fan_in))), classifier zero -> uniform output at init.
    model = build_model("smallcnn", num_classes=10, mean=(0.13,), std=(0.31,))
    x = jax.random.uniform(jax.random.key(1), (3, 28, 28, 1))
    p = model.init(jax.random.key(0), x, train=False)["params"]
    np.testing.assert_array_equal(model.apply({"params": p}, x, train=False), np.zeros((3, 10)))
    self.assertEqual(float(jnp.abs(p["classifier"]["kernel"]).max()), 0.0)
    for name, fan_in in (("fc0", 1024), ("fc1", 200)):
      for leaf in ("kernel", "bias"):
        w = np.asarray(p[name][leaf])
        bound = 1 / np.sqrt(fan_in)
        self.assertLessEqual(np.abs(w).max(), bound)
        self.assertGreater(np.abs(w).max(), 0.9 * bound)  # uniform over the whole range
    k = np.asarray(p["stage2_conv1"]["kernel"])  # fan_in 3*3*64, std sqrt(2/fan_in)
    np.testing.assert_allclose(k.std(), np.sqrt(2 / 576), rtol=0.05)
    self.assertEqual(float(jnp.abs(p["stage2_conv1"]["bias"]).max()), 0.0)

  @pytest.mark.slow
  def test_backbone_inits_follow_their_reference_code(self):
    x = jnp.zeros((1, 32, 32, 3))

    def params(name, **kw):
      return jax.device_get(
        build_model(name, **RGB, **kw).init(jax.random.key(0), x, train=False)["params"]
      )

    def assert_uniform(w, bound):
      w = np.asarray(w)
      self.assertLessEqual(np.abs(w).max(), bound)
      self.assertGreater(np.abs(w).max(), 0.9 * bound)
      np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=0.1)

    # kuangliu ResNet-18 / PreActResNet-18: PyTorch defaults, U(+-1/sqrt(fan_in)) everywhere.
    for name in ("resnet18", "preact_resnet18"):
      p = params(name)
      assert_uniform(p["stem_conv"]["kernel"], 1 / np.sqrt(27))
      assert_uniform(p["stage2_unit0"]["conv1"]["kernel"], 1 / np.sqrt(9 * 64))
      assert_uniform(p["stage2_unit0"]["shortcut_conv"]["kernel"], 1 / np.sqrt(64))
      assert_uniform(p["classifier"]["kernel"], 1 / np.sqrt(512))
      bias = np.asarray(p["classifier"]["bias"])  # 10 draws: bounds only
      self.assertLessEqual(np.abs(bias).max(), 1 / np.sqrt(512))
      self.assertGreater(np.abs(bias).min(), 0.0)
    # TRADES' WRN: convs N(0, 2 / (9 * Cout)), classifier PyTorch weight with zero bias.
    p = params("wrn16_8")
    np.testing.assert_allclose(
      np.asarray(p["stage3_unit0"]["conv1"]["kernel"]).std(), np.sqrt(2 / (9 * 512)), rtol=0.05
    )
    assert_uniform(p["classifier"]["kernel"], 1 / np.sqrt(512))
    self.assertEqual(float(np.abs(p["classifier"]["bias"]).max()), 0.0)
    # vgg_fsr: convs Kaiming-normal fan_out with zero bias, Dense N(0, 0.01^2) with zero bias.
    p = params("vgg16")
    np.testing.assert_allclose(
      np.asarray(p["stage4_conv0"]["kernel"]).std(), np.sqrt(2 / (9 * 512)), rtol=0.05
    )
    self.assertEqual(float(np.abs(p["stage4_conv0"]["bias"]).max()), 0.0)
    for name in ("fc0", "fc1", "classifier"):
      np.testing.assert_allclose(np.asarray(p[name]["kernel"]).std(), 0.01, rtol=0.1)
      self.assertEqual(float(np.abs(p[name]["bias"]).max()), 0.0)

  def test_registry(self):
    with self.assertRaisesRegex(ValueError, "wrn34_10.*tiny_bn"):
      build_model("wrn_34_10", **RGB)
    self.assertEqual(tuple(build_model("wrn34_10", **RGB).stage_sizes), (5, 5, 5))
    self.assertEqual(tuple(build_model("resnet50", **RGB).stage_sizes), (3, 4, 6, 3))
    # A dict of factories is frozen so the module stays hashable (static jit arguments).
    model = build_model("tiny_bn", **{**RGB, "mean": [0.5] * 3}, plugins={"stem": Zero})
    self.assertIsInstance(model.plugins, FrozenDict)
    hash(model)

  def test_max_pool_matches_nn_max_pool(self):
    for shape in [(2, 6, 6, 3), (2, 7, 5, 3)]:  # odd sizes crop, like VALID pooling
      x = jax.random.normal(jax.random.key(0), shape)
      np.testing.assert_array_equal(
        max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      )

  def test_max_pool_gradient_after_batch_norm_is_the_same_jitted_and_eager(self):
    # conv-BN-ReLU-pool as in SmallCNN-BN. In the suite's cheap-compile mode XLA computed the
    # BN multiply-add once with and once without FMA (for the max and for the gradient's
    # "equals the max" mask): the jitted gradient lost most windows' gradient (up to 87%).
    assert_max_gradient_jitted_equals_eager(max_pool_2x2, (4, 4, 4, 8))


class TinyBNTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    kx, ky = jax.random.split(jax.random.key(42))
    self.x = jax.random.uniform(kx, (6, 8, 8, 3))
    self.y = jax.random.randint(ky, (6,), 0, 10)

  def init(self, model, norm_ctx=None):
    v = model.init(jax.random.key(0), self.x, train=False, norm_ctx=norm_ctx)
    return {k: v[k] for k in ("params", "batch_stats")}

  def test_bn_train_uses_batch_stats_eval_uses_running_stats(self):
    model = build_model("tiny_bn", **RGB)
    v = self.init(model)
    other = jnp.concatenate([self.x[:1], 1.0 - self.x[1:]])  # same first example
    ev = lambda x: model.apply(v, x, train=False)[0]
    tr = lambda x: model.apply(v, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(ev(self.x), ev(other), atol=1e-6)
    (out_a, new), (out_b, _) = tr(self.x), tr(other)
    self.assertGreater(float(jnp.abs(out_a[0] - out_b[0]).max()), 1e-3)
    # Running stats change only in train mode.
    chex.assert_trees_all_close(
      model.apply(v, self.x, train=False, mutable=["batch_stats"])[1]["batch_stats"],
      v["batch_stats"],
    )
    self.assertGreater(float(jnp.abs(new["batch_stats"]["stem_bn"]["mean"]).max()), 1e-3)

  def test_bf16_compute_keeps_fp32_params_and_logits(self):
    model = build_model("tiny_bn", **RGB, dtype=jnp.bfloat16)
    v = model.init(jax.random.key(0), self.x, train=False)
    logits, state = model.apply(v, self.x, train=False, mutable=["intermediates"])
    self.assertEqual(logits.dtype, jnp.float32)
    self.assertEqual(state["intermediates"]["features"][0].dtype, jnp.bfloat16)
    self.assertTrue(all(a.dtype == jnp.float32 for a in jax.tree.leaves(v["params"])))

  def test_taps_in_intermediates(self):
    model = build_model("tiny_bn", **RGB)
    _, state = model.apply(self.init(model), self.x, train=False, mutable=["intermediates"])
    taps = state["intermediates"]
    self.assertEqual(
      set(taps), {"stem", "stage1.unit0", "stage1", "features", "embedding", "stage1_unit0"}
    )
    chex.assert_shape(find_tap(taps, "stage1.unit0.branch")[0], (6, 8, 8, 8))
    np.testing.assert_allclose(
      taps["embedding"][0], taps["features"][0].mean(axis=(1, 2)), rtol=1e-6
    )

  def test_label_dependent_plugin_with_aux_head(self):
    model = build_model("tiny_bn", **RGB, plugins={"features": LabelMask})
    v = self.init(model)
    self.assertEqual(v["params"]["plugin_features"]["w"].shape, (10, 8))
    train = lambda y: model.apply(v, self.x, train=True, labels=y, mutable=["batch_stats", "aux"])
    out, state = train(self.y)
    chex.assert_shape(state["aux"]["plugin_features"]["logits"][0], (6, 10))
    self.assertGreater(float(jnp.abs(out - train((self.y + 1) % 10)[0]).max()), 1e-4)
    ev = lambda y: model.apply(v, self.x, train=False, labels=y)
    np.testing.assert_array_equal(ev(self.y), ev((self.y + 1) % 10))
    np.testing.assert_array_equal(ev(self.y), ev(None))

  def test_branch_plugin_masks_only_the_residual_branch(self):
    for plugins in [None, {"stage1.unit0.branch": Zero}]:
      model = build_model("tiny_bn", **RGB, plugins=plugins)
      v = self.init(model)
      for train in (True, False):
        _, st = model.apply(v, self.x, train=train, mutable=["intermediates", "batch_stats"])
        taps = st["intermediates"]
        gap = float(jnp.abs(taps["stage1"][0] - taps["stem"][0]).max())
        if plugins:  # relu(0 + shortcut) with a post-ReLU input: the unit is the identity
          self.assertEqual(gap, 0.0)
          self.assertEqual(float(jnp.abs(find_tap(taps, "stage1.unit0.branch")[0]).max()), 0)
        else:
          self.assertGreater(gap, 1e-3)

  def test_preact_branch_site_leaves_the_shortcut_alone(self):
    zero = {"stage1.unit0.branch": Zero, "stage2.unit0.branch": Zero}
    model = WideResNet(depth=10, widen_factor=1, **RGB, plugins=zero)
    v = self.init(model)
    _, st = model.apply(v, self.x, train=False, mutable=["intermediates"])
    taps = st["intermediates"]
    np.testing.assert_array_equal(taps["stage1"][0], taps["stem"][0])  # identity shortcut
    # Projecting unit: the 1x1 shortcut reads BN-ReLU(input) (fresh running stats 0/1).
    a = jax.nn.relu(taps["stage1"][0] / jnp.sqrt(1 + 1e-5))
    kernel = v["params"]["stage2_unit0"]["shortcut_conv"]["kernel"][0, 0]
    np.testing.assert_allclose(taps["stage2"][0], a[:, ::2, ::2] @ kernel, atol=1e-5)

  def test_multi_branch_norm_routing(self):
    model = build_model(
      "tiny_bn", **RGB, norm=functools.partial(MultiBranchBatchNorm, num_branches=2)
    )
    v = self.init(model, norm_ctx={"branch": 1})
    self.assertEqual(set(v["params"]["stem_bn"]), {"branch0", "branch1"})
    apply = lambda v, ctx, train=False: model.apply(
      v, self.x, train=train, norm_ctx=ctx, mutable=["batch_stats"]
    )
    _, new = apply(v, {"branch": 1}, train=True)
    bs, old = new["batch_stats"]["stem_bn"], v["batch_stats"]["stem_bn"]
    chex.assert_trees_all_close(bs["branch0"], old["branch0"])
    self.assertGreater(float(jnp.abs(bs["branch1"]["mean"] - old["branch1"]["mean"]).max()), 1e-3)
    # Only the routed branch receives gradients.
    g = jax.grad(lambda p: apply({**v, "params": p}, {"branch": 1}, True)[0].sum())(v["params"])
    self.assertEqual(float(jnp.abs(g["stem_bn"]["branch0"]["scale"]).max()), 0.0)
    self.assertGreater(float(jnp.abs(g["stem_bn"]["branch1"]["scale"]).max()), 0.0)
    # After branch 1 has seen data the branches disagree; one-hot mixes equal routing.
    v = {**v, **new}
    out = {k: apply(v, {"branch": k})[0] for k in (0, 1)}
    self.assertGreater(float(jnp.abs(out[0] - out[1]).max()), 1e-3)
    np.testing.assert_array_equal(apply(v, None)[0], out[0])
    for k in (0, 1):
      onehot = jnp.tile(jax.nn.one_hot(k, 2), (6, 1))
      np.testing.assert_allclose(apply(v, {"mix": onehot})[0], out[k], atol=1e-6)
    onehot = jnp.tile(jnp.array([0.0, 1.0]), (6, 1))
    np.testing.assert_allclose(
      apply(v, {"mix": onehot}, True)[0], apply(v, {"branch": 1}, True)[0], atol=1e-6
    )

  def test_tap_gradient_through_perturb(self):
    model = build_model("tiny_bn", **RGB)
    v = model.init(jax.random.key(0), self.x, train=False)
    c = jax.random.normal(jax.random.key(3), (6, 10))
    loss = lambda pert: jnp.sum(model.apply({**v, "perturbations": pert}, self.x, train=False) * c)
    g = jax.grad(loss)(v["perturbations"])
    chex.assert_shape(g["features"], (6, 8, 8, 8))
    chex.assert_shape(find_tap(g, "stage1.unit0.branch"), (6, 8, 8, 8))
    # logits = mean_hw(features) @ K + b, so dL/dfeatures[b, h, w] = K @ c[b] / (H * W).
    kernel = v["params"]["classifier"]["kernel"]
    expected = jnp.broadcast_to((c @ kernel.T)[:, None, None, :] / 64, (6, 8, 8, 8))
    self.assertGreater(float(jnp.abs(g["features"]).max()), 1e-4)
    np.testing.assert_allclose(g["features"], expected, rtol=1e-5, atol=1e-7)


if __name__ == "__main__":
  absltest.main()
