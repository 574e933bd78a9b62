"""FSR: module shapes and sizes, the official mask and loss on hand values, train vs eval
masks, the transform on TRADES/MART's own passes, adaptive variants, smoke runs."""

import functools
import math
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from agad import defenses, models
from agad.attacks import iterative as pgd_lib
from agad.attacks import losses as attack_losses
from agad.defenses import fsr as fsr_module
from agad.defenses.fsr import FSRPlugin, fsr_loss, fsr_mask, top_wrong_class
from agad.objectives import base
from agad.objectives.mart import mart_loss
from agad.objectives.trades import trades_loss
from tests.helpers import objective_defaults, train_tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"
B, H, W, C, K = 6, 8, 8, 1, 10
WIDTH = 4  # small hidden width keeps the tiny-model tests fast


def _count(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(
  "name,shape,site,added,feature_shape",
  [
    ("resnet18", (32, 32, 3), "features", 1_259_018, (4, 4, 512)),  # after layer4
    ("wrn34_10", (32, 32, 3), "features", 1_555_210, (8, 8, 640)),  # after the final BN-ReLU
    ("vgg16", (32, 32, 3), "stage4", 1_259_018, (4, 4, 512)),  # 4th conv stage, before pool
    ("smallcnn", (28, 28, 1), "features", 222_346, (4, 4, 64)),  # after the second pool
  ],
)
def test_parameter_counts_and_site_shapes_match_the_official_modules(
  name, shape, site, added, feature_shape
):
  # 2 nets * (9*C*64 + 2*64 + 9*64*64 + 2*64 + 9*64*C) + a shared Linear(C, 10); no conv bias.
  c = feature_shape[-1]
  assert added == 2 * (9 * c * 64 + 128 + 9 * 64 * 64 + 128 + 9 * 64 * c) + c * 10 + 10
  bare = models.build_model(name, num_classes=10, mean=(0.5,) * shape[2], std=(0.25,) * shape[2])
  model = bare.clone(
    plugins=models.resolve_plugins(
      bare, {site: functools.partial(FSRPlugin, num_classes=10)}, shape
    )
  )
  x = jax.ShapeDtypeStruct((2,) + shape, jnp.float32)
  v0 = jax.eval_shape(lambda x: bare.init(jax.random.key(0), x, train=False), x)
  v1 = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False, mutable=True), x)
  assert _count(v1["params"]) - _count(v0["params"]) == added
  plugin = v1["params"]["plugin_" + site]
  assert set(plugin) == {
    "sep_conv0",
    "sep_bn0",
    "sep_conv1",
    "sep_bn1",
    "sep_conv2",
    "rec_conv0",
    "rec_bn0",
    "rec_conv1",
    "rec_bn1",
    "rec_conv2",
    "aux_head",
  }
  assert plugin["sep_conv0"]["kernel"].shape == (3, 3, c, 64) and "bias" not in plugin["sep_conv2"]
  assert plugin["aux_head"]["kernel"].shape == (c, 10)
  tap = jax.tree.leaves(v1["intermediates"]["stage4" if site == "stage4" else "features"])[0]
  assert tap.shape == (2,) + feature_shape


class _Host(nn.Module):
  """A stand-in parent carrying a backbone's init scheme (class constants, as backbones do)."""

  @nn.compact
  def __call__(self, x):
    return FSRPlugin(num_classes=10, name="plugin")(x, train=False)


@pytest.mark.parametrize("name", ["resnet18", "wrn34_10", "vgg16"])
def test_plugin_inits_follow_the_backbone_reference_code(name):
  backbone = type(models.build_model(name, num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3))
  host = type(
    "Host",
    (_Host,),
    {"conv_init": staticmethod(backbone.conv_init), "dense_init": backbone.dense_init},
  )()
  p = host.init(jax.random.key(0), jnp.zeros((1, 4, 4, 512)))["params"]["plugin"]
  k, head = p["sep_conv0"]["kernel"], p["aux_head"]  # k: fan_in 9 * 512, fan_out 9 * 64
  if (
    name == "resnet18"
  ):  # kuangliu: PyTorch defaults, conv and Linear U(+-1/sqrt(fan_in)), bias too
    assert 0.9 / math.sqrt(9 * 512) < float(jnp.abs(k).max()) <= 1 / math.sqrt(9 * 512)
    assert 0.9 / math.sqrt(512) < float(jnp.abs(head["bias"]).max()) <= 1 / math.sqrt(512)
  else:  # WRN (TRADES' init loop) and VGG (torchvision's): N(0, 2 / (9 C_out)) convs, zero Linear bias
    np.testing.assert_allclose(float(jnp.std(k)), math.sqrt(2 / (9 * 64)), rtol=0.02)
    np.testing.assert_array_equal(head["bias"], 0.0)
    if name == "vgg16":  # Linear N(0, 0.01^2)
      np.testing.assert_allclose(float(jnp.std(head["kernel"])), 0.01, rtol=0.05)
    else:  # Linear weight PyTorch default
      assert float(jnp.abs(head["kernel"]).max()) <= 1 / math.sqrt(512)


def _official_mask(r, tau, u1, u2):
  """gumbel_sigmoid.py transcribed in float64 numpy (softmax over the two entries)."""
  p = 1 / (1 + np.exp(-np.asarray(r, np.float64)))
  x = np.log(p + 1e-8) + -np.log(-np.log(u1 + 1e-8) + 1e-8)
  y = np.log(1 - p + 1e-8) + -np.log(-np.log(u2 + 1e-8) + 1e-8)
  x, y = x / (tau + 1e-8), y / (tau + 1e-8)
  mx = np.maximum(x, y)
  return np.exp(x - mx) / (np.exp(x - mx) + np.exp(y - mx))


class FsrMaskTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_eval_mask_on_hand_values(self):
    mask = self.variant(lambda r: fsr_mask(r, tau=0.1))
    # p = 1/2 -> 1/2; p = 3/4 -> sigmoid(10 ln 3) = 3^10 / (3^10 + 1); p = 1/4 -> 1 / (3^10 + 1).
    r = jnp.array([0.0, math.log(3.0), -math.log(3.0)])
    np.testing.assert_allclose(mask(r), [0.5, 59049 / 59050, 1 / 59050], rtol=1e-5, atol=1e-7)
    # tau = 1: m = p (up to the 1e-8 terms).
    np.testing.assert_allclose(
      self.variant(lambda r: fsr_mask(r, tau=1.0))(r), [0.5, 0.75, 0.25], rtol=1e-6
    )

  @chex.variants(with_jit=True, without_jit=True)
  def test_training_mask_on_hand_noise_and_against_the_official_formula(self):
    mask = self.variant(lambda r, u: fsr_mask(r, tau=0.1, u=u))
    # u1 = e^-1 -> g1 = 0; u2 = e^-e -> g2 = -1: m(r = 0) = sigmoid((0 + 0 - (-1)) / 0.1) = sigmoid(10).
    u = jnp.array([[math.exp(-1.0)], [math.exp(-math.e)]])
    np.testing.assert_allclose(mask(jnp.zeros(1), u), [1 / (1 + math.exp(-10))], rtol=1e-5)
    r = jax.random.normal(jax.random.key(0), (3, 2, 2, 5)) * 0.3
    u = jax.random.uniform(jax.random.key(1), (2,) + r.shape)
    np.testing.assert_allclose(
      mask(r, u), _official_mask(r, 0.1, np.asarray(u[0]), np.asarray(u[1])), rtol=2e-5, atol=1e-6
    )
    np.testing.assert_allclose(
      self.variant(lambda r: fsr_mask(r, tau=0.1))(r),
      _official_mask(r, 0.1, 0.5, 0.5),
      rtol=2e-5,
      atol=1e-6,
    )

  def test_bad_arguments_name_the_value_and_the_fix(self):
    with pytest.raises(
      ValueError, match=r"u has shape \(3,\); it must be \(2,\) \+ r.shape = \(2, 3\)"
    ):
      fsr_mask(jnp.zeros(3), u=jnp.zeros(3))
    with pytest.raises(ValueError, match="tau must be > 0, got 0.0"):
      fsr_mask(jnp.zeros(3), tau=0.0)


def test_mean_training_mask_matches_the_binary_concrete_expectation():
  r = jnp.array([-2.0, -0.5, 0.0, 0.3, 1.5])
  n = 20_000
  u = jax.random.uniform(jax.random.key(7), (2, n) + r.shape)
  m = jax.jit(lambda u: fsr_mask(jnp.broadcast_to(r, (n,) + r.shape), tau=0.1, u=u))(u)
  # E[sigmoid((logit + L) / tau)], L = g1 - g2 ~ Logistic(0, 1), by quadrature in float64.
  p = 1 / (1 + np.exp(-np.asarray(r, np.float64)))
  logit = np.log(p + 1e-8) - np.log(1 - p + 1e-8)
  grid = np.linspace(-40, 40, 400_001)
  density = np.exp(-np.abs(grid)) / (1 + np.exp(-np.abs(grid))) ** 2
  expected = np.array(
    [np.trapezoid(density / (1 + np.exp(-(a + grid) / 0.1)), grid) for a in logit]
  )
  np.testing.assert_allclose(np.asarray(m.mean(0)), expected, atol=0.01)
  # Training masks are (nearly) Bernoulli(p) draws; the eval mask is the steep sigmoid(r / tau).
  np.testing.assert_allclose(expected, p, atol=0.02)
  eval_mask = np.asarray(fsr_mask(r, tau=0.1))
  assert abs(eval_mask[3] - expected[3]) > 0.3  # r = 0.3: 0.95 at eval vs ~0.57 on average
  assert float(jnp.mean((m > 0.01) & (m < 0.99))) < 0.2  # tau = 0.1: mostly near 0 or 1


class FsrLossTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_fsr_loss_on_hand_values(self):
    logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    pos = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    neg = jnp.array([[0.0, 2.0, 0.0], [1.0, 1.0, 0.0]])
    rec = jnp.array([[0.0, 0.0, 1.0], [2.0, 0.0, 0.0]])
    labels = jnp.array([0, 0])
    # y': row 0 predicts its label -> the second-best class 1; row 1 predicts 1 -> 1.
    np.testing.assert_array_equal(top_wrong_class(logits, labels), [1, 1])
    lse = lambda *z: math.log(sum(math.exp(v) for v in z))
    ce_main = [lse(2, 1, 0) - 2, lse(0, 3, 1) - 0]
    ce_pos = [lse(1, 0, 0) - 1, lse(0, 0, 0) - 0]
    ce_neg = [lse(0, 2, 0) - 2, lse(1, 1, 0) - 1]  # against y' = 1
    ce_rec = [lse(0, 0, 1) - 0, lse(2, 0, 0) - 2]
    for lam_sep, lam_rec in ((1.0, 1.0), (0.5, 2.0)):
      expected = np.mean(
        [ce_main[i] + lam_sep * (ce_pos[i] + ce_neg[i]) + lam_rec * ce_rec[i] for i in range(2)]
      )
      fn = self.variant(functools.partial(fsr_loss, lam_sep=lam_sep, lam_rec=lam_rec))
      np.testing.assert_allclose(fn(logits, pos, neg, rec, labels), expected, rtol=1e-6)


def make_config(**fsr):
  c = ml_collections.ConfigDict()
  c.objective = objective_defaults(("standard", "pgd_at", "trades", "mart", "fsr"))
  c.objective.fsr.width = WIDTH
  c.objective.fsr.update(fsr)
  c.attack = ml_collections.ConfigDict(
    dict(
      eps=0.1,
      step_size=0.04,
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
  plugins = defenses.plugins_for("trades+fsr", cfg, K)
  model = models.build_model("tiny_bn", num_classes=K, mean=(0.5,), std=(0.25,), plugins=plugins)
  x = jax.random.uniform(jax.random.key(0), (B, H, W, C))
  y = jnp.arange(B) % K
  variables = model.init(jax.random.key(1), x, train=False, labels=y)
  # Running statistics near the batch's (10 train passes), so that eval != train mode but
  # the narrow nets' ReLUs stay alive.
  state = {"batch_stats": variables["batch_stats"]}
  step = jax.jit(lambda s: base.forward(model, variables["params"], s, x, mode="train").model_state)
  for _ in range(10):
    state = step(state)
  return cfg, model, variables["params"], state, {"image": x, "label": y}


def _bn_eval(x, bn, stats):
  return (x - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5) * bn["scale"] + bn["bias"]


def _conv(x, kernel):
  return jax.lax.conv_general_dilated(
    x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def _net_eval(x, p, s, prefix):
  for i in range(3):
    x = _conv(x, p[f"{prefix}_conv{i}"]["kernel"])
    if i < 2:
      x = jax.nn.relu(_bn_eval(x, p[f"{prefix}_bn{i}"], s[f"{prefix}_bn{i}"]))
  return x


def test_eval_output_is_the_official_composition_and_the_heads_are_shared(setup):
  _, model, params, state, batch = setup
  p, s = params["plugin_features"], state["batch_stats"]["plugin_features"]
  f = base.forward(model, params, state, batch["image"], mode="eval", taps=("stage1",)).taps[
    "stage1"
  ]
  f = jax.lax.stop_gradient(f)
  plugin = FSRPlugin(num_classes=K, width=WIDTH)
  out, col = plugin.apply({"params": p, "batch_stats": s}, f, train=False, mutable=["aux"])
  m = fsr_mask(_net_eval(f, p, s, "sep"), tau=0.1)
  assert 0.0 < float(m.min()) and float(m.max()) < 1.0
  np.testing.assert_allclose(
    out, f + (1 - m) * _net_eval((1 - m) * f, p, s, "rec"), rtol=1e-5, atol=1e-6
  )
  head = lambda z: z.mean(axis=(1, 2)) @ p["aux_head"]["kernel"] + p["aux_head"]["bias"]
  for name, value in (
    ("fsr_pos", m * f),
    ("fsr_neg", (1 - m) * f),
    ("fsr_rec", (1 - m) * f + (1 - m) * _net_eval((1 - m) * f, p, s, "rec")),
  ):
    chex.assert_shape(col["aux"][name][0], (B, K))
    np.testing.assert_allclose(col["aux"][name][0], head(value), rtol=1e-5, atol=1e-6)
  # The paper's R (final BN-ReLU) is an option that adds 2 C parameters and changes the output.
  paper = FSRPlugin(num_classes=K, width=WIDTH, rec_bn_relu=True)
  pv = paper.init(jax.random.key(0), f, train=False)
  assert _count(pv["params"]) - _count(p) == 2 * f.shape[-1]
  # f~ - f = (1 - m) R((1 - m) f): >= 0 with the paper's final ReLU, of both signs without.
  assert float(jnp.min(paper.apply(pv, f, train=False) - f)) >= -1e-6
  assert float(jnp.min(out - f)) < 0 < float(jnp.max(out - f))


def test_train_masks_draw_fresh_noise_per_pass_and_eval_masks_none(setup):
  cfg, model, params, state, batch = setup
  obj = defenses.build_objective("trades+fsr", model, cfg)
  adv = batch["image"]  # both passes see the same images: only the noise can differ
  mask_mean = lambda aux, name: np.asarray(
    aux.passes[name].aux["plugin_features"]["fsr_mask_mean"][0]
  )
  _, a1 = obj.loss(params, state, {}, batch, adv, jax.random.key(5), 0)
  _, a1_again = obj.loss(params, state, {}, batch, adv, jax.random.key(5), 0)
  _, a2 = obj.loss(params, state, {}, batch, adv, jax.random.key(6), 1)
  assert not np.array_equal(mask_mean(a1, "clean"), mask_mean(a1, "adv"))  # per pass
  assert not np.array_equal(mask_mean(a1, "adv"), mask_mean(a2, "adv"))  # per step
  np.testing.assert_array_equal(mask_mean(a1, "adv"), mask_mean(a1_again, "adv"))  # reproducible
  # Eval: deterministic (an rng is not even passed in); a train pass without rng uses u = 0.5.
  e1 = base.forward(model, params, state, adv, mode="eval", rng=jax.random.key(0))
  e2 = base.forward(model, params, state, adv, mode="eval", rng=jax.random.key(1))
  np.testing.assert_array_equal(e1.logits, e2.logits)
  b0 = base.forward(model, params, state, adv, mode="batch")
  b1 = base.forward(model, params, state, adv, mode="batch", rng=jax.random.key(1))
  b2 = base.forward(model, params, state, adv, mode="batch", rng=jax.random.key(2))
  assert not np.allclose(b1.logits, b2.logits) and not np.allclose(b0.logits, b1.logits)
  np.testing.assert_array_equal(
    b0.logits, base.forward(model, params, state, adv, mode="batch").logits
  )


def _terms(out, labels, lam_sep=1.0, lam_rec=1.0):
  a = out.aux["plugin_features"]
  return fsr_loss(
    out.logits,
    a["fsr_pos"][0],
    a["fsr_neg"][0],
    a["fsr_rec"][0],
    labels,
    lam_sep=lam_sep,
    lam_rec=lam_rec,
  ) - base.cross_entropy_mean(out.logits, labels)


@pytest.mark.parametrize(
  "inner,formula",
  [
    ("trades", lambda p, y: trades_loss(p["clean"].logits, p["adv"].logits, y, beta=6.0)),
    ("mart", lambda p, y: mart_loss(p["clean"].logits, p["adv"].logits, y, beta=6.0)),
  ],
)
@pytest.mark.slow
def test_transform_adds_exactly_the_terms_on_the_inner_adv_pass_without_a_pass(
  setup, inner, formula
):
  cfg, model, params, state, batch = setup
  cfg = make_config(lam_sep=0.7, lam_rec=1.3)
  outer = defenses.build_objective(f"{inner}+fsr", model, cfg)
  base_obj = defenses.build_objective(inner, model, cfg)
  assert outer.name == f"{inner}+fsr"
  adv = base_obj.generate(params, state, {}, batch, jax.random.key(2), 0)
  key = jax.random.key(3)
  value, aux = jax.jit(outer.loss)(params, state, {}, batch, adv, key, 0)
  inner_value, inner_aux = jax.jit(base_obj.loss)(params, state, {}, batch, adv, key, 0)
  y = batch["label"]
  terms = _terms(aux.passes["adv"], y, 0.7, 1.3)
  np.testing.assert_allclose(inner_value, formula(aux.passes, y), rtol=1e-6)
  np.testing.assert_allclose(value, inner_value + terms, rtol=1e-6)
  assert float(terms) > 0
  assert {"fsr_sep_loss", "fsr_rec_loss", "fsr_pos_accuracy", "fsr_mask_mean"} <= set(aux.metrics)
  jax.tree.map(np.testing.assert_array_equal, aux.model_state, inner_aux.model_state)
  # Same number of forward passes: as many convolutions in the jaxpr as the inner loss.
  count = lambda fn: str(jax.make_jaxpr(fn)(params, state, {}, batch, adv, key, 0)).count(
    "conv_general"
  )
  assert count(outer.loss) == count(base_obj.loss)


def test_standalone_fsr_is_eval_mode_ce_pgd_plus_the_terms(setup):
  cfg, model, params, state, batch = setup
  obj = defenses.build_objective("fsr", model, cfg)
  assert obj.name == "fsr" and obj.bn_policy.attack == "eval"
  key = jax.random.key(4)
  adv = obj.generate(params, state, {}, batch, key, 0)
  logits_fn = base.logits_fn_for(model, params, state, mode="eval")
  expected = pgd_lib.pgd(
    logits_fn,
    batch["image"],
    batch["label"],
    key,
    eps=0.1,
    step_size=0.04,
    steps=2,
    random_start="uniform",
    driver="unroll",
  )
  np.testing.assert_array_equal(adv, expected)
  value, aux = obj.loss(params, state, {}, batch, adv, jax.random.key(5), 0)
  out = aux.passes["adv"]
  a = out.aux["plugin_features"]
  np.testing.assert_allclose(
    value,
    fsr_loss(out.logits, a["fsr_pos"][0], a["fsr_neg"][0], a["fsr_rec"][0], batch["label"]),
    rtol=1e-6,
  )
  ref = base.forward(
    model,
    params,
    state,
    adv,
    mode="train",
    labels=batch["label"],
    rng=base.pass_key(jax.random.key(5), 0),
  )
  np.testing.assert_array_equal(out.logits, ref.logits)


def test_adaptive_combined_variant_descends_the_non_robust_term(setup):
  """Variant "": main CE + lam_sep [CE(h(f+), y) - CE(h(f-), y')] + lam_rec CE(h(f~-), y).

  The attacker wants the final prediction wrong. FSR trains f- = (1 - m) f to vote for y'
  (the top wrong class) and keeps f- in its output (f + (1 - m) R(f-)), so the attack
  descends CE(h(f-), y') (pushes f- toward y', with the main CE term); ascending it, as an
  attack on the training loss does, pushes f- away from y', i.e. helps the defender.
  """
  _, model, params, state, batch = setup
  cfg = make_config(lam_sep=0.7, lam_rec=1.3)
  obj = defenses.build_objective("trades+fsr", model, cfg)
  x, y = batch["image"], batch["label"]
  variants = obj.adaptive_loss(model, {"params": params, **state})
  assert set(variants) == {"", "st_t0.5", "st", "st_t2"}
  out = base.forward(model, params, state, x, mode="eval")
  a = out.aux["plugin_features"]
  pos, neg, rec = a["fsr_pos"][0], a["fsr_neg"][0], a["fsr_rec"][0]
  logits = np.asarray(out.logits)
  # y' by hand: the best class other than y.
  wrong = np.array(
    [max((k for k in range(K) if k != y[i]), key=lambda k: logits[i, k]) for i in range(B)]
  )
  ce = lambda z, t: (
    jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, jnp.asarray(t)[:, None], axis=-1)[:, 0]
  )
  attack = ce(out.logits, y) + 0.7 * (ce(pos, y) - ce(neg, wrong)) + 1.3 * ce(rec, y)
  chex.assert_shape(variants[""](x, y), (B,))
  np.testing.assert_allclose(variants[""](x, y), attack, rtol=1e-5, atol=1e-6)
  # Not the training loss: that one has + CE(h(f-), y') (2 * 0.7 * CE(neg, y') above it).
  train = ce(out.logits, y) + fsr_module.fsr_terms_per_example(
    out.logits, pos, neg, rec, y, lam_sep=0.7, lam_rec=1.3
  )
  np.testing.assert_allclose(train - variants[""](x, y), 1.4 * ce(neg, wrong), rtol=1e-5, atol=1e-6)
  assert float(jnp.min(ce(neg, wrong))) > 1e-3


def _straight_through_grad(model, params, state, x, y, tau_b):
  """d CE(f(x), y) / dx with the FSR mask's forward value at tau = 0.1 and its Jacobian that
  of the soft mask at ``tau_b``, by the chain rule (no stop_gradient trick): the gradient
  through f with the mask held at its value, plus the mask's cotangent pulled back through
  ``fsr_mask(S(f), tau=tau_b)``; then back through the backbone to x. Returns the gradient
  and its part through the mask."""
  p, s = params["plugin_features"], state["batch_stats"]["plugin_features"]
  head = params["classifier"]

  def loss(f, m):  # the plug-in's output and the backbone's head after the site
    out = f + (1 - m) * _net_eval((1 - m) * f, p, s, "rec")
    logits = out.mean(axis=(1, 2)) @ head["kernel"] + head["bias"]
    return jnp.sum(
      jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
    )

  features = lambda z: base.forward(model, params, state, z, mode="eval", taps=("stage1",)).taps[
    "stage1"
  ]
  f, pull_x = jax.vjp(features, x)
  m = fsr_mask(_net_eval(f, p, s, "sep"), tau=0.1)
  g_f, g_m = jax.grad(loss, argnums=(0, 1))(f, m)
  _, pull_soft = jax.vjp(lambda z: fsr_mask(_net_eval(z, p, s, "sep"), tau=tau_b), f)
  through_mask = pull_x(pull_soft(g_m)[0])[0]
  return pull_x(g_f)[0] + through_mask, through_mask


def test_straight_through_variants_use_their_backward_temperature(setup):
  _, model, params, state, batch = setup
  x, y = batch["image"], batch["label"]
  ce = lambda z: attack_losses.cross_entropy(
    base.forward(model, params, state, z, mode="eval").logits, y
  )
  grad = lambda fn: jax.grad(lambda z: jnp.sum(fn(z, y)))(x)
  g_ce = grad(lambda z, t: ce(z))
  through_mask = {}
  # "st" reads objective.fsr.adaptive_tau_backward (default 1); the others are fixed.
  for tau_backward, temperatures in (
    (1.0, {"st_t0.5": 0.5, "st": 1.0, "st_t2": 2.0}),
    (0.7, {"st": 0.7}),
  ):
    variants = defenses.build_objective(
      "trades+fsr", model, make_config(adaptive_tau_backward=tau_backward)
    ).adaptive_loss(model, {"params": params, **state})
    assert set(variants) == {"", "st_t0.5", "st", "st_t2"}
    for name, tau_b in temperatures.items():
      np.testing.assert_allclose(
        variants[name](x, y), ce(x), rtol=1e-6
      )  # the deployed forward value
      expected, through_mask[tau_b] = _straight_through_grad(model, params, state, x, y, tau_b)
      scale, g = float(jnp.max(jnp.abs(expected))), grad(variants[name])
      np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-4 * scale)
      assert not np.allclose(g, g_ce, rtol=1e-3, atol=1e-3 * scale)  # not the steep mask's
  # The temperature matters: the parts of the gradient through the mask differ.
  for a, b in ((0.5, 1.0), (1.0, 2.0), (0.5, 2.0), (0.7, 1.0)):
    scale = float(jnp.max(jnp.abs(through_mask[b])))
    assert scale > 1e-6 and not np.allclose(
      through_mask[a], through_mask[b], rtol=0.05, atol=0.05 * scale
    ), (a, b)
  st = defenses.with_plugin_overrides(model, tau_backward=2.0)
  assert st.plugins["features"].keywords["tau_backward"] == 2.0


def test_config_errors_name_the_value_and_a_misplaced_plugin_is_refused():
  with pytest.raises(ValueError, match=r"objective.fsr.tau = -1.0 must be > 0"):
    fsr_module.plugins(make_config(tau=-1.0), K)
  plugin = FSRPlugin(num_classes=K)
  with pytest.raises(
    ValueError, match=r"\[B, H, W, C\] feature map, got shape \(2, 8\).*objective.fsr.site"
  ):
    plugin.init(jax.random.key(0), jnp.zeros((2, 8)), train=False)


@pytest.mark.skipif(
  not os.path.exists(FMNIST),
  reason="Debian package dataset-fashion-mnist not installed (launch/env.sh installs it)",
)
@pytest.mark.parametrize("spec", ["fsr", "trades+fsr", "mart+fsr"])
@pytest.mark.slow
def test_fsr_and_its_compositions_train_through_the_loop(tmp_path, spec):
  """Each composition trains (the ``launch.train`` CLI itself: tests/docs_commands_test.py)."""
  config, lines = train_tiny(tmp_path, spec)
  sep = [l["train/fsr_sep_loss"] for l in lines if "train/fsr_sep_loss" in l]
  norms = [l["train/grad_norm"] for l in lines if "train/grad_norm" in l]
  assert (
    len(sep) == len(norms) == lines[-1]["step"] and all(np.isfinite(sep + norms)) and min(norms) > 0
  ), lines
  assert config.objective.fsr.tau == 0.1 and config.objective.fsr.site == "features"


def test_cifar10_resnet18_fsr_is_the_papers_recipe():
  from configs import cifar10

  c = cifar10.get_config("resnet18,fsr")
  assert (c.model.name, c.objective.name, c.num_epochs, tuple(c.optim.boundaries)) == (
    "resnet18",
    "fsr",
    100,
    (75, 90),
  )
  assert (
    c.optim.lr,
    c.optim.decay_factor,
    c.optim.momentum,
    c.optim.weight_decay,
    c.batch_size,
  ) == (0.1, 0.1, 0.9, 5e-4, 128)
  assert (c.attack.eps, c.attack.step_size, c.attack.steps, c.attack.random_start) == (
    8 / 255,
    2 / 255,
    10,
    "uniform",
  )
  assert c.objective.fsr.to_dict() == fsr_module.DEFAULTS.to_dict()
  assert (c.objective.fsr.lam_sep, c.objective.fsr.lam_rec, c.objective.fsr.tau) == (1.0, 1.0, 0.1)
