"""Tests for agad.models sites: unit and pre-pool sites, site_names, aliases, plug-in
validation, partial perturbation trees, SmallCNN-BN and input normalisation.

Registered backbones are only traced abstractly (site_names); real forwards run on small
ResNets with 8x8 inputs and on SmallCNN(-BN) with 28x28 inputs.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from agad.models import (
  INPUT_NORMS,
  MODEL_NAMES,
  MultiBranchBatchNorm,
  ResNet,
  WideResNet,
  build_model,
  find_tap,
  per_image_normalize,
  resolve_plugins,
  resolve_site,
  site_names,
)
from tests.models_test import RGB, Zero, n_params, smallcnn_formula

GRAY = dict(num_classes=10, mean=(0.13,), std=(0.31,))
PLAIN = ("smallcnn", "smallcnn_bn", "vgg16")


def input_shape(name):
  return (28, 28, 1) if name.startswith("smallcnn") else (32, 32, 3)


class ScaleBy(nn.Module):
  """Multiplies its site by a learnt scalar that starts at ``value`` (0: kills the site)."""

  value: float = 0.0

  @nn.compact
  def __call__(self, x, *, train, labels):
    return x * self.param("a", nn.initializers.constant(self.value), ())


def small_resnet(stage_sizes=(1, 2), **kw):
  """Post-activation ResNet with widths 8/16: stage 1 keeps the stem width (identity shortcuts)."""
  return ResNet(stage_sizes=stage_sizes, widths=(8, 16)[: len(stage_sizes)], **RGB, **kw)


class SiteNamesTest(parameterized.TestCase):
  @parameterized.parameters(*MODEL_NAMES)
  def test_every_unit_and_stage_has_a_site(self, name):
    model = build_model(name, **(GRAY if name.startswith("smallcnn") else RGB))
    names = site_names(model, input_shape(name))
    self.assertLen(set(names), len(names))  # no duplicates
    self.assertEqual((names[0], names[-2:]), ("stem", ("features", "embedding")))
    for s, n in enumerate(model.stage_sizes, start=1):
      self.assertIn(f"stage{s}", names)
      if name in PLAIN:  # n conv layers, no residual units
        self.assertIn(f"stage{s}.pre_pool", names)
        self.assertNotIn(f"stage{s}.unit0", names)
        continue
      for i in range(n):
        self.assertIn(f"stage{s}.unit{i}", names)
        self.assertIn(f"stage{s}.unit{i}.branch", names)
        # Forward order: the unit's branch, then its output, then the next unit.
        self.assertEqual(
          names.index(f"stage{s}.unit{i}"), names.index(f"stage{s}.unit{i}.branch") + 1
        )
      self.assertEqual(names.index(f"stage{s}"), names.index(f"stage{s}.unit{n - 1}") + 1)

  def test_order_and_plugins_do_not_matter(self):
    names = site_names(build_model("resnet18", **RGB), (32, 32, 3))
    self.assertEqual(
      names[:6],
      (
        "stem",
        "stage1.unit0.branch",
        "stage1.unit0",
        "stage1.unit1.branch",
        "stage1.unit1",
        "stage1",
      ),
    )
    self.assertLen(names, 1 + 4 * (2 * 2 + 1) + 2)
    # A plug-in (even one that would sow) is not part of the trace.
    with_plugin = build_model("resnet18", **RGB, plugins={"stage2.unit1": ScaleBy})
    self.assertEqual(site_names(with_plugin, (32, 32, 3)), names)
    self.assertEqual(
      site_names(build_model("vgg16", **RGB), (32, 32, 3)),
      (
        "stem",
        "stage1.pre_pool",
        "stage1",
        "stage2.pre_pool",
        "stage2",
        "stage3.pre_pool",
        "stage3",
        "stage4.pre_pool",
        "stage4",
        "stage5.pre_pool",
        "stage5",
        "features",
        "embedding",
      ),
    )
    with self.assertRaisesRegex(ValueError, r"\(H, W, C\)"):
      site_names(build_model("resnet18", **RGB), (1, 32, 32, 3))

  def test_resolve_site_aliases(self):
    r18 = build_model("resnet18", **RGB)
    wrn = build_model("wrn34_10", **RGB)
    self.assertEqual(resolve_site(r18, "stage3.unit[-1]"), "stage3.unit1")
    self.assertEqual(
      resolve_site(r18, "stage3.unit[-1].branch", (32, 32, 3)), "stage3.unit1.branch"
    )
    self.assertEqual(resolve_site(wrn, "stage3.unit[-1]"), "stage3.unit4")
    self.assertEqual(resolve_site(wrn, "stage3.unit[-1].branch"), "stage3.unit4.branch")
    self.assertEqual(resolve_site(wrn, "stage3.unit[-5]"), "stage3.unit0")
    self.assertEqual(resolve_site(wrn, "stage2.unit[3]"), "stage2.unit3")
    for plain in ("features", "stage3.unit2.branch", "stem"):
      self.assertEqual(resolve_site(wrn, plain), plain)

  def test_resolve_site_rejects_unknown_names_with_the_valid_list(self):
    r18 = build_model("resnet18", **RGB)
    for bad, why in [
      ("featurs", "did you mean 'features'"),
      ("stage3.unit[2]", "stage 3 has 2 units"),
      ("stage3.unit[-3]", "stage 3 has 2 units"),
      ("stage5.unit[0]", "stages 1..4"),
      ("stage3.unit2", "not a site"),
      ("stage3.unit[0].brunch", "not a site"),
    ]:
      with self.assertRaisesRegex(ValueError, why) as cm:
        resolve_site(r18, bad)
      self.assertIn("stage3.unit1.branch, stage3.unit1, stage3,", str(cm.exception))
    # Plain backbones have no units: stage_sizes counts their conv layers.
    with self.assertRaisesRegex(ValueError, "stage2.pre_pool"):
      resolve_site(build_model("smallcnn", **GRAY), "stage2.unit[-1]", (28, 28, 1))

  def test_resolve_plugins(self):
    wrn = build_model("wrn34_10", **RGB)
    plugins = resolve_plugins(
      wrn, {"stage3.unit[-1].branch": Zero, "features": ScaleBy}, (32, 32, 3)
    )
    self.assertEqual(plugins, {"stage3.unit4.branch": Zero, "features": ScaleBy})
    with self.assertRaisesRegex(
      ValueError,
      r"'featurs' \(did you mean 'features'\?\), "
      r"'stage3.unit\[5\]' \(did you mean 'stage3.unit4'.*\) not "
      r"found in WideResNet; valid site names: stem, "
      r"stage1.unit0.branch,",
    ):
      resolve_plugins(wrn, {"featurs": Zero, "stem": Zero, "stage3.unit[5]": Zero})
    with self.assertRaisesRegex(ValueError, "'stage3.unit4' and 'stage3.unit.-1.' both"):
      resolve_plugins(wrn, {"stage3.unit4": Zero, "stage3.unit[-1]": Zero})
    self.assertEqual(resolve_plugins(wrn, None), {})


class SiteValuesTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.x = jax.random.uniform(jax.random.key(42), (4, 8, 8, 3))

  def taps(self, model, train=False):
    v = model.init(jax.random.key(0), self.x, train=False)
    logits, st = model.apply(v, self.x, train=train, mutable=["intermediates", "batch_stats"])
    return v, logits, st["intermediates"]

  def test_unit_site_is_the_unit_output(self):
    _, _, taps = self.taps(small_resnet((2, 1)))
    t = lambda name: find_tap(taps, name)[0]
    # Post-activation: relu(branch + identity shortcut), the ReLU included.
    np.testing.assert_allclose(
      t("stage1.unit0"), jax.nn.relu(t("stage1.unit0.branch") + t("stem")), atol=1e-6
    )
    np.testing.assert_allclose(
      t("stage1.unit1"), jax.nn.relu(t("stage1.unit1.branch") + t("stage1.unit0")), atol=1e-6
    )
    self.assertGreater(float(jnp.abs(t("stage1.unit1") - t("stage1.unit0")).max()), 1e-3)
    np.testing.assert_array_equal(t("stage1.unit1"), t("stage1"))  # last unit = stage
    chex.assert_shape(t("stage2.unit0"), (4, 4, 4, 16))
    # Pre-activation units return branch + shortcut without a ReLU.
    _, _, taps = self.taps(WideResNet(depth=10, widen_factor=1, **RGB))
    np.testing.assert_array_equal(taps["stage2.unit0"][0], taps["stage2"][0])
    self.assertLess(float(taps["stage2.unit0"][0].min()), 0.0)

  def test_plugin_at_a_unit_site_is_called(self):
    base = small_resnet()
    _, logits, _ = self.taps(base)
    plugins = resolve_plugins(base, {"stage2.unit[-1]": ScaleBy}, (8, 8, 3))
    self.assertEqual(set(plugins), {"stage2.unit1"})
    v, out, taps = self.taps(small_resnet(plugins=plugins))
    # The plug-in child sits next to the unit child it follows, no name clash.
    self.assertEqual(v["params"]["plugin_stage2_unit1"]["a"], 0.0)
    self.assertIn("conv1", v["params"]["stage2_unit1"])
    self.assertGreater(float(jnp.abs(find_tap(taps, "stage2.unit1.branch")[0]).max()), 1e-3)
    np.testing.assert_array_equal(taps["stage2.unit1"][0], 0.0)  # the sown value is the output
    np.testing.assert_array_equal(taps["features"][0], 0.0)
    np.testing.assert_allclose(out, jnp.broadcast_to(v["params"]["classifier"]["bias"], (4, 10)))
    self.assertGreater(float(jnp.abs(out - logits).max()), 1e-3)

  def test_plugin_at_pre_pool(self):
    model = build_model("smallcnn", **GRAY, plugins={"stage2.pre_pool": Zero})
    x = jax.random.uniform(jax.random.key(1), (2, 28, 28, 1))
    v = model.init(jax.random.key(0), x, train=False)
    _, st = model.apply(v, x, train=False, mutable=["intermediates"])
    chex.assert_shape(st["intermediates"]["stage2.pre_pool"][0], (2, 8, 8, 64))
    np.testing.assert_array_equal(st["intermediates"]["stage2"][0], 0.0)
    self.assertGreater(float(jnp.abs(st["intermediates"]["stage1"][0]).max()), 1e-3)


class PartialPerturbationTest(absltest.TestCase):
  def check(self, model, x, variables, partial_path):
    """grad w.r.t. a one-site perturbation tree == that site's entry of the full-tree grad."""
    full = model.init(jax.random.key(0), x, train=False)["perturbations"]
    c = jax.random.normal(jax.random.key(3), (x.shape[0], 10))
    loss = lambda pert: jnp.sum(
      model.apply({**variables, "perturbations": pert}, x, train=False) * c
    )
    leaf = functools.reduce(lambda t, k: t[k], partial_path, full)
    partial = functools.reduce(lambda t, k: {k: t}, reversed(partial_path), leaf)
    g_full, g_part = jax.grad(loss)(full), jax.grad(loss)(partial)
    chex.assert_trees_all_equal_structs(g_part, partial)
    g = functools.reduce(lambda t, k: t[k], partial_path, g_part)
    self.assertGreater(float(jnp.abs(g).max()), 1e-6)
    chex.assert_trees_all_close(
      g, functools.reduce(lambda t, k: t[k], partial_path, g_full), rtol=1e-5, atol=1e-7
    )
    # A non-zero perturbation moves the logits exactly as in the full tree.
    d = jax.random.normal(jax.random.key(4), leaf.shape)
    full_d = jax.tree_util.tree_map_with_path(
      lambda p, a: d if tuple(k.key for k in p) == tuple(partial_path) else a, full
    )
    partial_d = functools.reduce(lambda t, k: {k: t}, reversed(partial_path), d)
    chex.assert_trees_all_close(loss(partial_d), loss(full_d), rtol=1e-5)
    self.assertGreater(float(jnp.abs(loss(partial_d) - loss(full))), 1e-4)

  def test_one_top_level_site_on_smallcnn(self):
    model = build_model("smallcnn", **GRAY)
    x = jax.random.uniform(jax.random.key(1), (3, 28, 28, 1))
    params = model.init(jax.random.key(0), x, train=False)["params"]
    # The zero classifier would make every tap gradient 0.
    params = {
      **params,
      "classifier": {
        **params["classifier"],
        "kernel": jax.random.normal(jax.random.key(5), params["classifier"]["kernel"].shape),
      },
    }
    self.check(model, x, {"params": params}, ("features",))
    self.check(model, x, {"params": params}, ("stage2.pre_pool",))

  def test_one_nested_site_on_a_small_resnet(self):
    model = small_resnet()
    x = jax.random.uniform(jax.random.key(1), (3, 8, 8, 3))
    v = model.init(jax.random.key(0), x, train=False)
    v = {k: v[k] for k in ("params", "batch_stats")}
    self.check(model, x, v, ("stage2_unit1", "stage2.unit1.branch"))
    self.check(model, x, v, ("stage2.unit0",))

  def test_init_still_creates_every_zero_perturbation(self):
    model = small_resnet()
    pert = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)["perturbations"]
    self.assertEqual(
      set(pert),
      {
        "stem",
        "stage1_unit0",
        "stage1.unit0",
        "stage1",
        "stage2_unit0",
        "stage2.unit0",
        "stage2_unit1",
        "stage2.unit1",
        "stage2",
        "features",
        "embedding",
      },
    )
    self.assertEqual(float(jnp.abs(find_tap(pert, "stage2.unit1.branch")).max()), 0.0)


class SmallCNNBNTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))

  def test_parameter_count(self):
    model = build_model("smallcnn_bn", **GRAY)
    v = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32),
    )
    bn = 2 * (32 + 32 + 64 + 64)
    self.assertEqual(n_params(v["params"]), 312_586)
    self.assertEqual(n_params(v["params"]), smallcnn_formula(28, 1) + bn)
    self.assertEqual(n_params(v["batch_stats"]), bn)

  def test_conv_bn_relu_and_smallcnn_init(self):
    model = build_model("smallcnn_bn", **GRAY)
    v = model.init(jax.random.key(0), self.x, train=False)
    np.testing.assert_array_equal(model.apply(v, self.x, train=False), np.zeros((4, 10)))
    _, st = model.apply(v, self.x, train=True, mutable=["intermediates", "batch_stats"])
    c = nn.Conv(32, (3, 3), padding=0).apply(
      {"params": v["params"]["stage1_conv0"]}, (self.x - 0.13) / 0.31
    )
    mu, var = c.mean(axis=(0, 1, 2)), c.var(axis=(0, 1, 2))
    np.testing.assert_allclose(
      st["intermediates"]["stem"][0], jax.nn.relu((c - mu) / jnp.sqrt(var + 1e-5)), atol=1e-4
    )
    self.assertEqual(
      set(v["params"]),
      set(build_model("smallcnn", **GRAY).init(jax.random.key(0), self.x, train=False)["params"])
      | {f"stage{s}_bn{i}" for s in (1, 2) for i in (0, 1)},
    )

  def test_multi_branch_norm_train_and_eval(self):
    model = build_model(
      "smallcnn_bn", **GRAY, norm=functools.partial(MultiBranchBatchNorm, num_branches=3)
    )
    v = model.init(jax.random.key(0), self.x, train=False)
    self.assertEqual(n_params(v["params"]), smallcnn_formula(28, 1) + 3 * 384)
    self.assertEqual(set(v["params"]["stage2_bn1"]), {"branch0", "branch1", "branch2"})
    out, st = model.apply(
      v, self.x, train=True, norm_ctx={"branch": 2}, mutable=["batch_stats", "intermediates"]
    )
    chex.assert_shape(out, (4, 10))
    new, old = st["batch_stats"]["stage2_bn1"], v["batch_stats"]["stage2_bn1"]
    chex.assert_trees_all_close(new["branch0"], old["branch0"])
    self.assertGreater(float(jnp.abs(new["branch2"]["mean"] - old["branch2"]["mean"]).max()), 1e-3)
    out_eval, st_eval = model.apply(v, self.x, train=False, mutable=["intermediates"])
    chex.assert_shape(out_eval, (4, 10))
    chex.assert_tree_all_finite((st["intermediates"], st_eval["intermediates"]))
    # Batch statistics (train) vs fresh running statistics (eval) give different features.
    self.assertGreater(
      float(
        jnp.abs(
          st["intermediates"]["embedding"][0] - st_eval["intermediates"]["embedding"][0]
        ).max()
      ),
      1e-3,
    )


class InputNormTest(absltest.TestCase):
  def test_per_image_normalize_is_tf_per_image_standardization_on_0_255_pixels(self):
    # TF's documented example: arange(1, 13) as one [2, 2, 3] image. Here it is fed as
    # [0, 1] pixels (divided by 255); the result must be TF's output on the raw values.
    x = (jnp.arange(1.0, 13.0) / 255.0).reshape(1, 2, 2, 3)
    tf_doc = [
      -1.593255,
      -1.3035723,
      -1.0138896,
      -0.7242068,
      -0.4345241,
      -0.14484136,
      0.14484136,
      0.4345241,
      0.7242068,
      1.0138896,
      1.3035723,
      1.593255,
    ]
    np.testing.assert_allclose(np.asarray(per_image_normalize(x)).ravel(), tf_doc, rtol=1e-5)
    # One mean and std over all H*W*C values, not per channel: channel 0 = [0, .2, .4, .6],
    # channel 1 constant .7 -> mean .5, var (2.52 / 8) - .25 = .065; channel 1 is not zeroed.
    x = jnp.array([[[[0.0, 0.7], [0.2, 0.7]], [[0.4, 0.7], [0.6, 0.7]]]])
    out = per_image_normalize(x)
    np.testing.assert_allclose(out, (x - 0.5) / np.sqrt(0.065), rtol=1e-5)
    # The std floor 1/sqrt(N) on 0-255 pixels is 1/(255 sqrt(8)) here: an image whose std
    # is below it is scaled by 255 sqrt(8); a constant image maps to 0 with a finite gradient.
    flat = jnp.full((1, 2, 2, 2), 0.3).at[0, 0, 0, 0].add(8e-6)
    np.testing.assert_allclose(
      per_image_normalize(flat), (flat - jnp.mean(flat)) * 255 * np.sqrt(8), rtol=1e-3
    )
    g = jax.grad(lambda v: jnp.sum(per_image_normalize(v) * jnp.arange(8.0).reshape(1, 2, 2, 2)))(
      jnp.full((1, 2, 2, 2), 0.3)
    )
    chex.assert_tree_all_finite(g)
    # Per example: a second image does not change the first one's result.
    both = per_image_normalize(jnp.concatenate([x, 1.0 - x * 0.5]))
    np.testing.assert_array_equal(both[:1], out)

  def test_backbone_prepare_and_build_model(self):
    x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
    prep = lambda model, x: model.apply({}, x, method=lambda m, x: m.prepare(x))
    models = {k: build_model("tiny_bn", **RGB, input_norm=k) for k in INPUT_NORMS}
    np.testing.assert_allclose(
      prep(models["dataset"], x), (x - jnp.array(RGB["mean"])) / jnp.array(RGB["std"]), rtol=1e-6
    )
    np.testing.assert_allclose(
      prep(models["per_image"], x), per_image_normalize(x), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(prep(models["none"], x), x)
    # Per-image standardisation makes the logits invariant to per-image contrast/brightness.
    model = models["per_image"]
    v = model.init(jax.random.key(1), x, train=False)
    np.testing.assert_allclose(
      model.apply(v, x, train=False), model.apply(v, 0.5 * x + 0.2, train=False), atol=1e-3
    )
    self.assertGreater(
      float(
        jnp.abs(
          models["dataset"].apply(v, x, train=False)
          - models["dataset"].apply(v, 0.5 * x + 0.2, train=False)
        ).max()
      ),
      1e-3,
    )
    with self.assertRaisesRegex(ValueError, "'per-image' is not one of .*'per_image'"):
      build_model("tiny_bn", **RGB, input_norm="per-image")


if __name__ == "__main__":
  absltest.main()
