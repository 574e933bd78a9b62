"""Tests for agad.attention: hand-computed maps, the GAP + linear identity, Grad-CAM at any
site against a hand-split model, double backprop, batch independence, ASC and shift."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest, parameterized
from jax.test_util import check_grads

from agad import attention as at
from agad.defenses.agkd_bml import attention_map as agkd_attention_map
from agad.models import build_model, max_pool_2x2
from tests.helpers import assert_max_gradient_jitted_equals_eager

RGB = dict(num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
GRAY = dict(num_classes=10, mean=(0.3,), std=(0.35,))

# One example, H = 2, W = 1, C = 2: channel 0 is [1, 3], channel 1 is [2, -1].
A_HAND = jnp.array([[[[1.0, 2.0]], [[3.0, -1.0]]]])  # [1, 2, 1, 2]


def square_head(u):
  """``z_k = sum_c U[c, k] mean_hw(A_c^2)``.

  So ``d z_k / d A[h, w, c] = 2 U[c, k] A[h, w, c] / HW``.
  """
  return lambda a: jnp.einsum("bc,ck->bk", jnp.mean(a**2, axis=(1, 2)), u)


def gap_linear(w, b):
  return lambda a: a.mean(axis=(1, 2)) @ w + b


def tiny_bn(batch=6, size=8, seed=0):
  """TinyBNNet with non-trivial BN statistics, and a batch of images."""
  model = build_model("tiny_bn", **RGB)
  x = jax.random.uniform(jax.random.key(seed), (batch, size, size, 3))
  v = model.init(jax.random.key(1), x, train=False)
  stats = jax.tree.map(
    lambda s: s + 0.3 * jax.random.uniform(jax.random.key(2), s.shape), v["batch_stats"]
  )
  return model, {"params": v["params"], "batch_stats": stats}, x


def smallcnn(name="smallcnn", batch=4):
  """SmallCNN(-BN) with a random (not zero) classifier, so its logits depend on the input."""
  model = build_model(name, **GRAY)
  x = jax.random.uniform(jax.random.key(3), (batch, 28, 28, 1))
  v = dict(model.init(jax.random.key(4), x, train=False))
  v.pop("intermediates", None)
  v.pop("perturbations", None)
  params = dict(v["params"])
  params["classifier"] = {
    "kernel": 0.3 * jax.random.normal(jax.random.key(5), params["classifier"]["kernel"].shape),
    "bias": params["classifier"]["bias"],
  }
  v["params"] = params
  return model, v, x


class PureMapsTest(chex.TestCase, parameterized.TestCase):
  @parameterized.named_parameters(
    ("minmax", lambda f: at.normalize_maps(jnp.sum(f, -1), "minmax")),
    ("max", lambda f: at.normalize_maps(jnp.sum(f, -1), "max")),
    ("agkd_bml_attention_map", agkd_attention_map),
  )
  def test_map_normalisation_gradient_after_batch_norm_is_the_same_jitted_and_eager(self, head):
    # Each takes a max (and a min) over a map of conv-BN-ReLU features, like max_pool_2x2,
    # whose gradient this check caught (tests/helpers.py).
    assert_max_gradient_jitted_equals_eager(head, (4, 8, 8))

  @parameterized.parameters(
    ("mean", [[1.5], [1.0]]),
    ("sum", [[3.0], [2.0]]),
    ("abs_mean", [[1.5], [2.0]]),
    ("sq_mean", [[2.5], [5.0]]),
  )
  def test_channel_attention_by_hand(self, reduce, expected):
    m = at.channel_attention(A_HAND, reduce=reduce)
    chex.assert_shape(m, (1, 2, 1))
    chex.assert_trees_all_close(m, jnp.array([expected]), atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_cam_by_hand(self):
    w = jnp.array([[1.0, -2.0, 0.5], [3.0, 1.0, 0.0]])  # [C=2, K=3]
    a = jnp.concatenate([A_HAND, A_HAND])
    m = self.variant(lambda a, k: at.cam(a, w, k))(a, jnp.array([0, 1]))
    # class 0: 1*[1, 3] + 3*[2, -1] = [7, 0]; class 1: -2*[1, 3] + 1*[2, -1] = [0, -7].
    chex.assert_shape(m, (2, 2, 1))
    chex.assert_trees_all_close(m, jnp.array([[[7.0], [0.0]], [[0.0], [-7.0]]]), atol=1e-6)
    relu = self.variant(lambda a, k: at.cam(a, w, k, relu=True))(a, jnp.array([0, 1]))
    chex.assert_trees_all_close(relu, jnp.array([[[7.0], [0.0]], [[0.0], [0.0]]]), atol=1e-6)
    norm = at.cam(a, w, jnp.array([0, 1]), normalize="minmax")
    chex.assert_trees_all_close(norm, jnp.array([[[1.0], [0.0]], [[1.0], [0.0]]]), atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_grad_cam_by_hand(self):
    # alpha_c = mean_hw U[c, k] A_c = U[c, k] mean(A_c), mean(A_0) = 2, mean(A_1) = 0.5.
    # class 0 (U[:, 0] = [1, -1]): 2 [1, 3] - 0.5 [2, -1] = [1, 6.5].
    # class 1 (U[:, 1] = [0, 2]):  1 [2, -1] = [2, -1]; relu -> [2, 0].
    head = square_head(jnp.array([[1.0, 0.0], [-1.0, 2.0]]))
    a = jnp.concatenate([A_HAND, A_HAND])
    fn = self.variant(lambda a, k, relu: at.grad_cam(head, a, k, relu=relu), static_argnums=2)
    m = fn(a, jnp.array([0, 1]), True)
    chex.assert_shape(m, (2, 2, 1))
    chex.assert_trees_all_close(m, jnp.array([[[1.0], [6.5]], [[2.0], [0.0]]]), atol=1e-6)
    raw = fn(a, jnp.array([0, 1]), False)
    chex.assert_trees_all_close(raw, jnp.array([[[1.0], [6.5]], [[2.0], [-1.0]]]), atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_grad_cam_of_gap_linear_head_is_relu_cam_over_hw(self):
    ka, kw, kb = jax.random.split(jax.random.key(0), 3)
    a = jax.random.normal(ka, (5, 4, 3, 6))
    w, b = jax.random.normal(kw, (6, 7)), jax.random.normal(kb, (7,))
    k = jnp.array([0, 3, 6, 1, 3])
    gc = self.variant(lambda a, w, k: at.grad_cam(gap_linear(w, b), a, k))(a, w, k)
    chex.assert_shape(gc, (5, 4, 3))
    chex.assert_trees_all_close(gc, jax.nn.relu(at.cam(a, w, k)) / 12.0, atol=1e-6)
    self.assertGreater(float(jnp.abs(gc).max()), 0.1)  # not trivially zero

  def test_per_example_class_gradient(self):
    # Each example's map uses its own class logit: example b of a batch equals the map of
    # that example alone.
    a = jax.random.normal(jax.random.key(1), (4, 3, 3, 5))
    head = square_head(jax.random.normal(jax.random.key(2), (5, 4)))
    k = jnp.array([3, 0, 2, 2])
    full = at.grad_cam(head, a, k, relu=False)
    for b in range(4):
      chex.assert_trees_all_close(
        full[b : b + 1], at.grad_cam(head, a[b : b + 1], k[b : b + 1], relu=False), atol=1e-6
      )

  def test_normalize(self):
    maps = jnp.stack([jnp.full((3, 3), 2.5), jnp.arange(9.0).reshape(3, 3) - 4.0])
    mm = at.normalize_maps(maps, "minmax")
    chex.assert_trees_all_close(mm[0], jnp.zeros((3, 3)))  # constant -> 0
    chex.assert_trees_all_close(mm[1], jnp.arange(9.0).reshape(3, 3) / 8.0, atol=1e-6)
    chex.assert_trees_all_close(at.normalize_maps(maps, "max")[1], (maps[1] / 4.0), atol=1e-6)
    l2 = at.normalize_maps(maps, "l2")
    chex.assert_trees_all_close(jnp.sum(l2**2, axis=(1, 2)), jnp.ones(2), atol=1e-5)
    # Gradients stay finite on constant and zero maps.
    for method in ("minmax", "max", "l2"):
      zero_and_ramp = jnp.zeros((2, 3, 3)).at[1].set(maps[1])
      g = jax.grad(lambda m: at.normalize_maps(m, method).sum())(zero_and_ramp)
      self.assertTrue(bool(jnp.all(jnp.isfinite(g))), method)
    with self.assertRaisesRegex(ValueError, "normalize='softmax'"):
      at.normalize_maps(maps, "softmax")

  @chex.variants(with_jit=True, without_jit=True)
  def test_asc_on_constructed_maps(self):
    m = jnp.zeros((3, 4, 4))
    m = m.at[0, 0, 0].set(1.0).at[0, 1, 1].set(0.7).at[0, 2, 2].set(0.51).at[0, 3, 3].set(0.5)
    m = m.at[1].set(jnp.full((4, 4), 3.0))  # constant positive: every pixel counts
    # m[2] all zero: 0 > 0 is false, so ASC 0
    values = self.variant(at.asc)(m)
    chex.assert_shape(values, (3,))
    chex.assert_trees_all_close(values, jnp.array([3 / 16, 1.0, 0.0]))  # 0.5 is not > 0.5
    chex.assert_trees_all_close(self.variant(lambda m: at.asc(m, lam=0.6))(m)[0], 2 / 16)

  @chex.variants(with_jit=True, without_jit=True)
  def test_shift_on_constructed_maps(self):
    a = jnp.zeros((2, 4, 4)).at[:, 0, 0].set(1.0)
    b = jnp.zeros((2, 4, 4)).at[0, 3, 3].set(1.0).at[1, 0, 0].set(1.0).at[1, 0, 1].set(1.0)
    shift = self.variant(
      lambda a, b, metric, frac: at.attention_shift(a, b, metric=metric, top_frac=frac),
      static_argnums=(2, 3),
    )
    # Disjoint one-hots: L1 = 2/16, L2 = sqrt(2/16), cosine 1, IoU of the top pixel 0.
    # Overlapping: |a - b| is one pixel; cos = 1/sqrt(2); top-2 of a = {(0,0), (0,1)} (ties
    # broken by position) = top-2 of b[1], IoU 1 -> shift 0; top-1: {(0,0)} both -> 0;
    # top-2 of b[0] = {(3,3), (0,0)}: IoU 1/3 -> 2/3.
    chex.assert_trees_all_close(shift(a, b, "l1", 0.2), jnp.array([2 / 16, 1 / 16]), atol=1e-6)
    chex.assert_trees_all_close(
      shift(a, b, "l2", 0.2), jnp.sqrt(jnp.array([2 / 16, 1 / 16])), atol=1e-6
    )
    chex.assert_trees_all_close(
      shift(a, b, "cosine", 0.2), jnp.array([1.0, 1 - 2**-0.5]), atol=1e-6
    )
    chex.assert_trees_all_close(shift(a, b, "iou", 1 / 16), jnp.array([1.0, 0.0]), atol=1e-6)
    chex.assert_trees_all_close(shift(a, b, "iou", 2 / 16), jnp.array([2 / 3, 0.0]), atol=1e-6)
    # top-3 (k = round(0.1875 * 16) = 3): a -> {(0,0), (0,1), (0,2)}, b[0] -> {(3,3), (0,0),
    # (0,1)}: IoU 2/4 -> 0.5.
    chex.assert_trees_all_close(shift(a, b, "iou", 3 / 16)[0], 0.5, atol=1e-6)

  @parameterized.parameters("l1", "l2", "cosine", "iou")
  def test_shift_is_zero_for_identical_maps(self, metric):
    m = jax.random.normal(jax.random.key(0), (3, 5, 5)).at[1].set(0.0).at[2].set(2.0)
    shift = at.attention_shift(m, m, metric=metric)
    chex.assert_shape(shift, (3,))
    chex.assert_trees_all_close(shift, jnp.zeros(3), atol=1e-6)
    other = at.attention_shift(m, m[::-1], metric=metric)
    self.assertGreater(float(other[0]), 0.0)
    g = jax.grad(lambda m: at.attention_shift(m, m * 0.5 + 0.1, metric=metric).sum())(m)
    self.assertTrue(bool(jnp.all(jnp.isfinite(g))))

  def test_upsample(self):
    m = jnp.array([[[0.0, 1.0], [0.0, 1.0]]])
    up = at.upsample(m, 4)
    chex.assert_shape(up, (1, 4, 4))
    chex.assert_trees_all_close(up[0, 0], jnp.array([0.0, 0.25, 0.75, 1.0]), atol=1e-6)
    chex.assert_shape(at.upsample(m, (6, 3)), (1, 6, 3))
    with self.assertRaisesRegex(ValueError, "size"):
      at.upsample(m, (0, 3))

  def test_vmap_over_an_outer_axis(self):
    a = jax.random.normal(jax.random.key(0), (3, 2, 4, 4, 5))  # [T, B, H, W, C]
    head = square_head(jax.random.normal(jax.random.key(1), (5, 3)))
    k = jnp.array([[0, 1], [2, 2], [1, 0]])
    fns = {
      "grad_cam": lambda a, k: at.grad_cam(head, a, k, normalize="minmax"),
      "channel": lambda a, k: at.channel_attention(a, reduce="sq_mean"),
      "asc": lambda a, k: at.asc(at.grad_cam(head, a, k)),
      "iou": lambda a, k: at.attention_shift(a.mean(-1), a.max(-1), metric="iou"),
      "up": lambda a, k: at.upsample(a.mean(-1), 8),
    }
    for name, fn in fns.items():
      batched = jax.vmap(fn)(a, k)
      looped = jnp.stack([fn(a[t], k[t]) for t in range(3)])
      chex.assert_trees_all_close(batched, looped, atol=1e-5, custom_message=name)

  def test_errors_name_the_bad_value(self):
    a = jnp.ones((2, 3, 3, 4))
    with self.assertRaisesRegex(ValueError, "reduce='max'"):
      at.channel_attention(a, reduce="max")
    with self.assertRaisesRegex(ValueError, r"NHWC .*\(3, 3, 4\)"):
      at.channel_attention(a[0])
    with self.assertRaisesRegex(ValueError, r"\[C, K\] with C = 4.*\(10, 4\)"):
      at.cam(a, jnp.ones((10, 4)), jnp.zeros(2, int))
    with self.assertRaisesRegex(ValueError, r"classes must be \[B\] = \[2\]"):
      at.cam(a, jnp.ones((4, 10)), jnp.zeros(3, int))
    with self.assertRaisesRegex(ValueError, "metric='kl'"):
      at.attention_shift(a[..., 0], a[..., 0], metric="kl")
    with self.assertRaisesRegex(ValueError, "top_frac=0"):
      at.attention_shift(a[..., 0], a[..., 0], metric="iou", top_frac=0)
    with self.assertRaisesRegex(ValueError, "upsample one of them"):
      at.attention_shift(a[..., 0], a[:, :2, :, 0])


class GradCamSecondOrderTest(parameterized.TestCase):
  @pytest.mark.slow
  def test_check_grads_order_2_through_a_grad_cam_loss(self):
    # A 2-layer net: A = tanh(1x1 conv(x; w1)), z = mean_hw(softplus(A)) @ w2. The loss is
    # a Grad-CAM (attention-transfer style) loss, differentiated w.r.t. both layers.
    with jax.enable_x64(True):
      x = jax.random.normal(jax.random.key(0), (3, 4, 4, 2), jnp.float64)
      target = jax.random.uniform(jax.random.key(1), (3, 4, 4), jnp.float64)
      params = {
        "w1": 0.7 * jax.random.normal(jax.random.key(2), (2, 5), jnp.float64),
        "w2": jax.random.normal(jax.random.key(3), (5, 3), jnp.float64),
      }
      k = jnp.array([0, 2, 1])

      def loss(p):
        a = jnp.tanh(jnp.einsum("bhwi,io->bhwo", x, p["w1"]))
        head = lambda a: jax.nn.softplus(a).mean(axis=(1, 2)) @ p["w2"]
        m = at.grad_cam(head, a, k, relu=False, normalize="l2")
        return jnp.sum((m - target) ** 2)

      self.assertEqual(loss(params).dtype, jnp.float64)
      check_grads(loss, (params,), order=2, modes=("rev",), eps=1e-4)
      g = jax.grad(loss)(params)
      self.assertGreater(float(jnp.abs(g["w2"]).sum()), 0.0)  # the head's weights learn


class ModelMapsTest(chex.TestCase, parameterized.TestCase):
  def test_maps_kinds_shapes_and_gap_identity(self):
    model, v, x = tiny_bn()
    out = at.maps(model, v, x)
    self.assertEqual(set(out), {"grad_cam", "cam", "channel_mean"})
    for m in out.values():
      chex.assert_shape(m, (6, 8, 8))
      self.assertEqual(m.dtype, jnp.float32)
    # TinyBNNet's head is GAP + Dense: grad_cam at features = relu(cam) / (H * W).
    chex.assert_trees_all_close(out["grad_cam"], jax.nn.relu(out["cam"]) / 64.0, atol=1e-6)
    self.assertGreater(float(out["grad_cam"].max()), 1e-3)
    tg = at.tap_grad(model, v, x)
    chex.assert_trees_all_equal(tg.classes, jnp.argmax(model.apply(v, x, train=False), -1))
    chex.assert_trees_all_close(tg.logits, model.apply(v, x, train=False), atol=1e-6)
    chex.assert_trees_all_close(out["channel_mean"], tg.features.mean(-1), atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_maps_jit(self):
    model, v, x = tiny_bn()
    fn = self.variant(
      lambda v, x, k: at.maps(
        model, v, x, k, site="stage1.unit[-1].branch", kinds=("grad_cam", "channel_sq_mean")
      )
    )
    k = jnp.arange(6) % 10
    out = fn(v, x, k)
    chex.assert_shape(out["grad_cam"], (6, 8, 8))
    chex.assert_trees_all_close(
      out,
      at.maps(model, v, x, k, site="stage1.unit0.branch", kinds=("grad_cam", "channel_sq_mean")),
      atol=1e-6,
    )

  def test_maps_vmap_over_an_outer_axis(self):
    model, v, x = tiny_bn()
    xs = jnp.stack([x[:3], x[3:]])  # [2, 3, 8, 8, 3]
    fn = lambda x: at.maps(
      model, v, x, site="stage1.unit0.branch", kinds=("grad_cam", "channel_mean")
    )
    batched = jax.vmap(fn)(xs)
    chex.assert_shape(batched["grad_cam"], (2, 3, 8, 8))
    chex.assert_trees_all_close(
      batched, jax.tree.map(lambda a, b: jnp.stack([a, b]), fn(xs[0]), fn(xs[1])), atol=1e-6
    )

  def test_grad_cam_at_a_nested_site_equals_a_hand_split_model(self):
    # TinyBNNet after the branch site: relu(branch + stem) (identity shortcut) -> GAP ->
    # classifier.
    model, v, x = tiny_bn()
    classes = jnp.array([1, 0, 9, 4, 4, 7])
    y = model.apply(v, x, train=False, mutable=["intermediates"])[1]["intermediates"]
    stem, branch = y["stem"][0], y["stage1_unit0"]["stage1.unit0.branch"][0]
    cls = v["params"]["classifier"]
    head = lambda b: jax.nn.relu(b + stem).mean(axis=(1, 2)) @ cls["kernel"] + cls["bias"]
    chex.assert_trees_all_close(head(branch), model.apply(v, x, train=False), atol=1e-5)
    expected = at.grad_cam(head, branch, classes)
    got = at.maps(model, v, x, classes, site="stage1.unit0.branch", kinds=("grad_cam",))
    chex.assert_trees_all_close(got["grad_cam"], expected, atol=1e-6)
    self.assertGreater(float(expected.max()), 1e-4)
    # site_head is the same split, emulated through the site's perturbation.
    a0, head_fn = at.site_head(model, v, x, site="stage1.unit0.branch")
    chex.assert_trees_all_close(a0, branch, atol=1e-6)
    chex.assert_trees_all_close(head_fn(a0), model.apply(v, x, train=False), atol=1e-5)
    chex.assert_trees_all_close(at.grad_cam(head_fn, a0, classes), expected, atol=1e-6)

  @parameterized.parameters("smallcnn", "smallcnn_bn")
  def test_grad_cam_before_the_last_pool_equals_a_hand_split_smallcnn(self, name):
    model, v, x = smallcnn(name)
    p = v["params"]
    dense = lambda h, layer: h @ p[layer]["kernel"] + p[layer]["bias"]

    def head(a):  # pool 2 -> flatten -> fc0-ReLU -> fc1-ReLU -> classifier
      h = max_pool_2x2(a).reshape(a.shape[0], -1)
      return dense(jax.nn.relu(dense(jax.nn.relu(dense(h, "fc0")), "fc1")), "classifier")

    y = model.apply(v, x, train=False, mutable=["intermediates"])[1]["intermediates"]
    a = y["stage2.pre_pool"][0]
    chex.assert_shape(a, (4, 8, 8, 64))  # the 8x8 site beside the 4x4 features
    logits = model.apply(v, x, train=False)
    chex.assert_trees_all_close(head(a), logits, atol=1e-5)
    pred = jnp.argmax(logits, -1)
    got = at.maps(model, v, x, site="stage2.pre_pool", kinds=("grad_cam", "channel_mean"))
    chex.assert_trees_all_close(got["grad_cam"], at.grad_cam(head, a, pred), atol=1e-6)
    chex.assert_shape(got["channel_mean"], (4, 8, 8))
    self.assertGreater(float(got["grad_cam"].max()), 1e-5)
    chex.assert_shape(at.maps(model, v, x, kinds=("grad_cam",))["grad_cam"], (4, 4, 4))

  @parameterized.parameters(
    ("tiny_bn", "features"),
    ("tiny_bn", "stage1.unit0.branch"),
    ("tiny_bn", "stem"),
    ("smallcnn_bn", "stage2.pre_pool"),
    ("smallcnn_bn", "features"),
  )
  def test_eval_maps_do_not_depend_on_the_batch(self, name, site):
    model, v, x = tiny_bn() if name == "tiny_bn" else smallcnn(name, batch=6)
    kinds = ("grad_cam", "channel_mean") + (
      ("cam",) if at.supports_cam(model, v, x.shape[1:], site=site) else ()
    )
    run = lambda x, k=None: at.maps(model, v, x, k, site=site, kinds=kinds)
    full = run(x)
    perm = jnp.array([3, 5, 0, 1, 4, 2])
    chex.assert_trees_all_close(run(x[perm]), jax.tree.map(lambda m: m[perm], full), atol=1e-5)
    split = [run(x[:2]), run(x[2:])]
    chex.assert_trees_all_close(
      jax.tree.map(lambda a, b: jnp.concatenate([a, b]), *split), full, atol=1e-5
    )
    k = jnp.array([2, 2, 7, 0, 1, 9])
    chex.assert_trees_all_close(
      run(x[perm], k[perm]), jax.tree.map(lambda m: m[perm], run(x, k)), atol=1e-5
    )

  def test_batch_statistics_mode_at_features_is_per_example(self):
    # No BatchNorm after `features`: in "batch" mode the features use batch statistics,
    # but each logit still depends on its own example's features only, so Grad-CAM is the
    # GAP + linear head's on those features.
    model, v, x = tiny_bn()
    tg = at.tap_grad(model, v, x, jnp.arange(6), mode="batch")
    eval_tg = at.tap_grad(model, v, x, jnp.arange(6), mode="eval")
    self.assertGreater(float(jnp.abs(tg.features - eval_tg.features).max()), 1e-3)
    cls = v["params"]["classifier"]
    expected = at.grad_cam(gap_linear(cls["kernel"], cls["bias"]), tg.features, jnp.arange(6))
    got = at.maps(model, v, x, jnp.arange(6), kinds=("grad_cam",), mode="batch")["grad_cam"]
    chex.assert_trees_all_close(got, expected, atol=1e-6)

  def test_double_backprop_through_model_maps(self):
    # A student's Grad-CAM loss at a nested site trains its weights (params and the
    # classifier after the site both receive gradient), under jit.
    model, v, x = tiny_bn()
    target = jax.random.uniform(jax.random.key(9), (6, 8, 8))

    @jax.jit
    def loss(params):
      m = at.maps(
        model,
        {**v, "params": params},
        x,
        jnp.arange(6),
        site="stage1.unit0.branch",
        kinds=("grad_cam",),
        normalize="minmax",
      )["grad_cam"]
      return jnp.mean((m - target) ** 2)

    g = jax.grad(loss)(v["params"])
    for path in (("classifier", "kernel"), ("stem_conv", "kernel")):
      leaf = g[path[0]][path[1]]
      self.assertTrue(bool(jnp.all(jnp.isfinite(leaf))), path)
      self.assertGreater(float(jnp.abs(leaf).sum()), 0.0, path)
    # First-order check along a random direction against a central difference (small step:
    # ReLUs in the model make the loss piecewise smooth).
    d = jax.tree.map(lambda p: jax.random.normal(jax.random.key(7), p.shape) * 1e-2, v["params"])
    h = 3e-3
    plus = loss(jax.tree.map(lambda p, e: p + h * e, v["params"], d))
    minus = loss(jax.tree.map(lambda p, e: p - h * e, v["params"], d))
    directional = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(d)))
    np.testing.assert_allclose((plus - minus) / (2 * h), directional, rtol=0.02, atol=1e-7)

  def test_cam_only_where_gap_and_linear_follow(self):
    model, v, x = smallcnn()
    with self.assertRaisesRegex(ValueError, "hidden Dense layers .*fc0, fc1.*grad_cam"):
      at.maps(model, v, x)
    self.assertFalse(at.supports_cam(model, v, x.shape[1:]))
    model, v, x = tiny_bn()
    with self.assertRaisesRegex(ValueError, "site 'stem' is not 'features'"):
      at.maps(model, v, x, site="stem", kinds=("cam",))
    self.assertTrue(at.supports_cam(model, v, x.shape[1:]))
    with self.assertRaisesRegex(ValueError, "not a site of this model"):
      at.maps(model, v, x, site="stage9", kinds=("grad_cam",))
    with self.assertRaisesRegex(ValueError, "'gradcam'"):
      at.maps(model, v, x, kinds=("gradcam",))


if __name__ == "__main__":
  absltest.main()
