"""AGAIN: ase_weights, label-mixed training masks (y' per site and pass), eval masks, HFF,
alpha = 1 is CAS, loss terms, the +again transform without an extra pass, AWP on the heads,
per-backbone sites, recipes, and training through launch.train."""

import math
import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from agad import data as data_lib
from agad import defenses, models
from agad.attacks import losses as attack_losses
from agad.defenses import again as again_lib
from agad.defenses import _cas_family as cas_family
from agad.defenses.again import (
  AUX_NAME,
  OTHER_LABELS_NAME,
  ASEPlugin,
  ase_weights,
  hybrid_feature_fusion,
)
from agad.objectives.awp import awp_perturbation
from agad.objectives import base
from agad.objectives.mart import mart_loss
from tests.helpers import assert_close, objective_defaults, train_tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"
B, H, W, C, K = 6, 8, 8, 1, 10
NAMES = ("standard", "pgd_at", "trades", "mart", "awp", "cas", "again")


# --- Pure functions ------------------------------------------------------------------


class PureFunctionsTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_ase_weights_on_hand_values(self):
    kernel = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # [C=2, K=3]: W[k] = kernel[:, k]
    labels, other = jnp.array([0, 2]), jnp.array([1, 1])
    out = self.variant(ase_weights)(kernel, labels, other)
    # 0.6 [1, 4] + 0.4 [2, 5]; 0.6 [3, 6] + 0.4 [2, 5]
    np.testing.assert_allclose(out, [[1.4, 4.4], [2.6, 5.6]], rtol=1e-6)
    half = self.variant(lambda *a: ase_weights(*a, alpha=0.5))(kernel, labels, other)
    np.testing.assert_allclose(half, [[1.5, 4.5], [2.5, 5.5]], rtol=1e-6)
    one = self.variant(lambda *a: ase_weights(*a, alpha=1.0))(kernel, labels, other)
    np.testing.assert_array_equal(one, [[1.0, 4.0], [3.0, 6.0]])  # CAS's W[y], exactly

  def test_ase_weights_rejects_a_row_vector(self):
    with pytest.raises(ValueError, match=r"\[C, K\] kernel, got shape \(3,\)"):
      ase_weights(jnp.ones(3), jnp.array([0]), jnp.array([0]))

  @chex.variants(with_jit=True, without_jit=True)
  def test_hff_one_hot_weights_are_identity_and_adain(self):
    a = 3.0 * jax.random.normal(jax.random.key(0), (4, 5, 5, 3)) + 1.0
    perm = jnp.array([2, 0, 3, 1])
    one_hot = lambda i: jnp.tile(jax.nn.one_hot(i, 4), (4, 1))
    hff = self.variant(hybrid_feature_fusion)
    np.testing.assert_allclose(hff(a, perm, one_hot(0)), a, atol=1e-5)
    # e2: the statistics of the shuffled batch A' = AdaIN(A, A'); e3: those of AdaIN(A, A'),
    # which are A''s again (up to eps); e4: those of AdaIN(A', A), i.e. A's.
    style = a[perm]
    mu_s = style.mean(axis=(1, 2), keepdims=True)
    sd_s = jnp.sqrt(style.var(axis=(1, 2), keepdims=True) + 1e-5)
    mu, sd = a.mean(axis=(1, 2), keepdims=True), jnp.sqrt(a.var(axis=(1, 2), keepdims=True) + 1e-5)
    adain_hand = sd_s * (a - mu) / sd + mu_s
    for i in (1, 2):
      np.testing.assert_allclose(hff(a, perm, one_hot(i)), adain_hand, atol=1e-4)
    np.testing.assert_allclose(hff(a, perm, one_hot(3)), a, atol=1e-4)
    # A mixture: the output's per-channel mean is the mixed mean (Eq. 5-6).
    g = jnp.tile(jnp.array([0.1, 0.2, 0.3, 0.4]), (4, 1))
    out = hff(a, perm, g)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), (0.5 * mu + 0.5 * mu_s)[:, 0, 0], atol=1e-4)

  def test_hff_needs_spatial_axes(self):
    with pytest.raises(ValueError, match="spatial axes.*hff=False"):
      hybrid_feature_fusion(jnp.ones((4, 3)), jnp.arange(4), jnp.ones((4, 4)) / 4)

  def test_per_example_loss_on_hand_values(self):
    labels = jnp.array([0])
    main = jnp.zeros((1, 4))  # CE = ln 4
    aux = {
      "plugin_a": {AUX_NAME: (jnp.array([[math.log(3.0), 0.0, 0.0, 0.0]]),)},  # p_y = 1/2
      "plugin_b": {AUX_NAME: (jnp.zeros((1, 4)),), OTHER_LABELS_NAME: (labels,)},
    }
    # ln 4 + 2 * (ln 2 + ln 4) / 2 = 5 ln 2
    np.testing.assert_allclose(
      again_lib.again_per_example(main, aux, labels, 2.0), [5 * math.log(2.0)], rtol=1e-6
    )
    with pytest.raises(ValueError, match="build_model"):
      again_lib.again_per_example(main, {}, labels, 2.0)


# --- The plug-in ---------------------------------------------------------------------


def test_plugin_training_mask_mixes_label_and_permuted_label_rows():
  feats = jax.random.normal(jax.random.key(0), (B, 3, 3, 5))
  labels = jnp.array([0, 1, 2, 3, 0, 1])
  plugin = ASEPlugin(num_classes=4)
  variables = plugin.init(jax.random.key(1), feats, train=False)
  kernel, bias = variables["params"]["kernel"], variables["params"]["bias"]
  run = lambda key: plugin.apply(
    variables, feats, train=True, labels=labels, mutable=["aux"], rngs={"plugins": key}
  )
  out, col = run(jax.random.key(7))
  other = col["aux"][OTHER_LABELS_NAME][0]
  np.testing.assert_array_equal(np.sort(other), np.sort(labels))  # y' is a permutation of y
  mask = 0.6 * kernel.T[labels] + 0.4 * kernel.T[other]
  np.testing.assert_allclose(out, feats * mask[:, None, None, :], rtol=1e-6)
  # The head sees the unmasked pooled features.
  np.testing.assert_allclose(
    col["aux"][AUX_NAME][0], feats.mean(axis=(1, 2)) @ kernel + bias, rtol=1e-5
  )
  _, again_col = run(jax.random.key(7))
  np.testing.assert_array_equal(again_col["aux"][OTHER_LABELS_NAME][0], other)  # reproducible
  others = {
    tuple(np.asarray(run(jax.random.key(s))[1]["aux"][OTHER_LABELS_NAME][0])) for s in range(8)
  }
  assert len(others) > 1  # fresh per key
  # Over many draws the mask's mean is 0.6 W[y] + 0.4 mean_j W[y_j] (y' uniform over the batch).
  masks = jax.vmap(lambda k: run(k)[0] / feats)(jax.random.split(jax.random.key(3), 4000))
  expected = 0.6 * kernel.T[labels] + 0.4 * kernel.T[labels].mean(axis=0)
  np.testing.assert_allclose(masks.mean(axis=0)[:, 0, 0, :], expected, atol=0.02)
  # Without the plug-in rng a training pass is an error naming the fix.
  with pytest.raises(ValueError, match="pass_key"):
    plugin.apply(variables, feats, train=True, labels=labels, mutable=["aux"])


def test_plugin_eval_mask_is_the_predicted_row_and_ignores_labels():
  feats = jax.random.normal(jax.random.key(0), (3, 2, 2, 5))
  plugin = ASEPlugin(num_classes=4)
  variables = plugin.init(jax.random.key(1), feats, train=False)
  kernel, bias = variables["params"]["kernel"], variables["params"]["bias"]
  pred = jnp.argmax(feats.mean(axis=(1, 2)) @ kernel + bias, -1)
  for labels in (None, (pred + 1) % 4):
    out, _ = plugin.apply(
      variables,
      feats,
      train=False,
      labels=labels,
      mutable=["aux"],
      rngs={"plugins": jax.random.key(2)},
    )
    np.testing.assert_allclose(out, feats * kernel.T[pred][:, None, None, :], rtol=1e-6)
  st = ASEPlugin(num_classes=4, straight_through=True)
  out_st, _ = st.apply(variables, feats, train=False, mutable=["aux"])
  np.testing.assert_allclose(out_st, feats * kernel.T[pred][:, None, None, :], rtol=1e-6)


def test_plugin_with_hff_changes_training_passes_only():
  feats = jax.random.normal(jax.random.key(0), (4, 3, 3, 5))
  plain, fused = ASEPlugin(num_classes=4, alpha=1.0), ASEPlugin(num_classes=4, alpha=1.0, hff=True)
  variables = plain.init(jax.random.key(1), feats, train=False)
  labels = jnp.array([0, 1, 2, 3])
  kw = dict(train=True, labels=labels, mutable=["aux"], rngs={"plugins": jax.random.key(5)})
  assert not np.allclose(
    fused.apply(variables, feats, **kw)[0], plain.apply(variables, feats, **kw)[0]
  )
  ev = dict(train=False, mutable=["aux"])
  np.testing.assert_array_equal(
    fused.apply(variables, feats, **ev)[0], plain.apply(variables, feats, **ev)[0]
  )


# --- Objectives on a tiny model with the default two sites ---------------------------


def make_config(**again_fields):
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(dict(name="tiny_bn"))
  c.objective = objective_defaults(NAMES)
  c.objective.cas.sites = again_lib.DEFAULT_SITES["tiny_bn"]
  c.objective.cas.random_start = "normal"
  for k, v in again_fields.items():
    c.objective.again[k] = v
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


def build(spec, cfg):
  plugins = models.resolve_plugins(
    models.build_model("tiny_bn", num_classes=K, mean=(0.5,), std=(0.25,)),
    defenses.plugins_for(spec, cfg, K),
    (H, W, C),
  )
  return models.build_model("tiny_bn", num_classes=K, mean=(0.5,), std=(0.25,), plugins=plugins)


@pytest.fixture(scope="module")
def setup():
  cfg = make_config()
  model = build("again", cfg)
  assert sorted(model.plugins) == ["features", "stage1.unit0.branch"]
  x = jax.random.uniform(jax.random.key(0), (B, H, W, C))
  y = jnp.arange(B) % K
  variables = model.init(jax.random.key(1), x, train=False, labels=y)
  state = {"batch_stats": jax.tree.map(lambda s: s + 0.2, variables["batch_stats"])}
  return cfg, model, variables["params"], state, {"image": x, "label": y}


def _others(out):
  found = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(out.aux)[0]:
    if OTHER_LABELS_NAME in jax.tree_util.keystr(path):
      found[jax.tree_util.keystr(path)] = np.asarray(leaf)
  return found


def test_again_loss_is_ce_plus_two_mean_aux_ce_with_per_site_permutations(setup):
  cfg, model, params, state, batch = setup
  obj = defenses.build_objective("again", model, cfg)
  adv = obj.generate(params, state, {}, batch, jax.random.key(2), 0)
  value, aux = jax.jit(obj.loss)(params, state, {}, batch, adv, jax.random.key(3), 0)
  ref = base.forward(
    model,
    params,
    state,
    adv,
    mode="train",
    labels=batch["label"],
    rng=base.pass_key(jax.random.key(3), 0),
  )
  heads = cas_family.aux_logits(ref.aux, AUX_NAME)
  assert len(heads) == 2
  y = batch["label"]
  expected = jnp.mean(attack_losses.cross_entropy(ref.logits, y)) + 2.0 * 0.5 * sum(
    jnp.mean(attack_losses.cross_entropy(h, y)) for h in heads
  )
  # Jitted loss vs an eager forward: two programs, float32 tolerances (tests/helpers.py).
  assert_close(value, expected)
  assert_close(aux.model_state, ref.model_state)
  perms = list(_others(aux.passes["adv"]).values())
  assert len(perms) == 2 and not np.array_equal(perms[0], perms[1])  # one y' per site
  assert all(np.array_equal(np.sort(p), np.sort(y)) for p in perms)
  _, aux2 = obj.loss(params, state, {}, batch, adv, jax.random.key(4), 1)  # next step's key
  assert all(not np.array_equal(a, b) for a, b in zip(perms, _others(aux2.passes["adv"]).values()))
  assert set(aux.metrics) >= {"adv_accuracy", "aux_accuracy"}


def test_train_masks_depend_on_the_draw_eval_masks_on_the_prediction_only(setup):
  _, model, params, state, batch = setup
  x, y = batch["image"], batch["label"]
  t = lambda k: (
    base.forward(model, params, state, x, mode="train", labels=y, rng=jax.random.key(k)).logits
  )
  np.testing.assert_array_equal(t(0), t(0))
  assert not np.allclose(t(0), t(1))
  e = lambda labels: base.forward(model, params, state, x, mode="eval", labels=labels).logits
  np.testing.assert_array_equal(e(y), e((y + 3) % K))
  np.testing.assert_array_equal(e(y), e(None))


def test_alpha_one_is_cas_loss_gradient_and_attack(setup):
  _, _, _, state, batch = setup
  cfg = make_config(alpha=1.0)
  cas_model, again_model = build("cas", cfg), build("again", cfg)
  params = again_model.init(jax.random.key(1), batch["image"], train=False)["params"]
  cas_obj, again_obj = (
    defenses.build_objective("cas", cas_model, cfg),
    defenses.build_objective("again", again_model, cfg),
  )
  adv_cas = cas_obj.generate(params, state, {}, batch, jax.random.key(2), 0)
  adv_again = again_obj.generate(params, state, {}, batch, jax.random.key(2), 0)
  np.testing.assert_array_equal(adv_cas, adv_again)
  grad = lambda obj: jax.value_and_grad(obj.loss, has_aux=True)(
    params, state, {}, batch, adv_cas, jax.random.key(3), 0
  )
  (v_cas, a_cas), g_cas = grad(cas_obj)
  (v_again, a_again), g_again = grad(again_obj)
  np.testing.assert_array_equal(v_cas, v_again)
  chex.assert_trees_all_close(g_cas, g_again, rtol=0, atol=1e-7)
  chex.assert_trees_all_close(a_cas.model_state, a_again.model_state, rtol=0, atol=1e-7)
  # The default alpha = 0.6 is not CAS.
  v_06, _ = defenses.build_objective("again", build("again", make_config()), make_config()).loss(
    params, state, {}, batch, adv_cas, jax.random.key(3), 0
  )
  assert abs(float(v_06) - float(v_cas)) > 1e-4


def test_attack_uses_the_eval_mode_combined_loss_normal_start_and_step_option(setup, monkeypatch):
  cfg, model, params, state, batch = setup
  obj = defenses.build_objective("again", model, cfg)
  x, y = batch["image"], batch["label"]
  variants = obj.adaptive_loss(model, {"params": params, **state})
  assert set(variants) == {"", "st", "st_t10"}
  out = base.forward(model, params, state, x, mode="eval", labels=y)
  heads = cas_family.aux_logits(out.aux, AUX_NAME)
  expected = (
    attack_losses.cross_entropy(out.logits, y)
    + 2.0 * sum(attack_losses.cross_entropy(h, y) for h in heads) / 2
  )
  np.testing.assert_allclose(variants[""](x, y), expected, rtol=1e-5)
  np.testing.assert_allclose(variants["st"](x, y), expected, rtol=1e-5)
  g = lambda v: jax.grad(lambda z: jnp.sum(variants[v](z, y)))(x)
  assert not np.allclose(g(""), g("st"), atol=1e-7)
  np.testing.assert_allclose(variants["st_t10"](x, y), expected, rtol=1e-5)
  assert not np.allclose(g("st"), g("st_t10"), atol=1e-7)
  adv = obj.generate(params, state, {}, batch, jax.random.key(4), 0)
  assert float(jnp.abs(adv - x).max()) <= 0.1 + 1e-6
  assert float(jnp.sum(variants[""](adv, y))) > float(jnp.sum(variants[""](x, y)))
  assert obj.bn_policy.attack == "eval"
  seen = {}
  from agad.objectives import training_attack

  real = training_attack.pgd_lib.pgd_general
  monkeypatch.setattr(
    training_attack.pgd_lib, "pgd_general", lambda *a, **kw: seen.update(kw) or real(*a, **kw)
  )
  obj.generate(params, state, {}, batch, jax.random.key(4), 0)
  assert seen["random_start"] == "normal" and seen["step_size"] == 0.04  # config.attack's step
  paper = defenses.build_objective("again", model, make_config(step_size=4 / 255))
  paper.generate(params, state, {}, batch, jax.random.key(4), 0)
  assert seen["step_size"] == 4 / 255


def test_mart_again_adds_the_terms_on_marts_adv_pass_without_another_pass(setup):
  cfg, _, _, state, batch = setup
  model = build("mart+again", cfg)
  params = model.init(jax.random.key(1), batch["image"], train=False)["params"]
  obj, mart = (
    defenses.build_objective("mart+again", model, cfg),
    defenses.build_objective("mart", model, cfg),
  )
  assert obj.name == "mart+again"
  adv = obj.generate(params, state, {}, batch, jax.random.key(2), 0)
  np.testing.assert_array_equal(
    adv, mart.generate(params, state, {}, batch, jax.random.key(2), 0)
  )  # MART's attack
  value, aux = obj.loss(params, state, {}, batch, adv, jax.random.key(3), 0)
  y = batch["label"]
  heads = cas_family.aux_logits(aux.passes["adv"].aux, AUX_NAME)
  expected = (
    mart_loss(aux.passes["clean"].logits, aux.passes["adv"].logits, y, beta=6.0)
    + 2.0 * sum(jnp.mean(attack_losses.cross_entropy(h, y)) for h in heads) / 2
  )
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  count = lambda fn: str(
    jax.make_jaxpr(fn)(params, state, {}, batch, adv, jax.random.key(3), 0)
  ).count("conv_general")
  assert count(obj.loss) == count(mart.loss)
  # Each of MART's two training passes draws its own y' at each site.
  clean, adv_perms = _others(aux.passes["clean"]), _others(aux.passes["adv"])
  assert len(clean) == 2 and all(not np.array_equal(clean[k], adv_perms[k]) for k in clean)
  assert "again_aux_accuracy" in aux.metrics
  assert set(obj.adaptive_loss(model, {"params": params, **state})) == {"", "st", "st_t10"}


def test_pgd_at_again_has_agains_loss_and_pgd_ats_attack(setup):
  cfg, model, params, state, batch = setup
  obj = defenses.build_objective("pgd_at+again", model, cfg)
  adv = defenses.build_objective("pgd_at", model, cfg).generate(
    params, state, {}, batch, jax.random.key(2), 0
  )
  np.testing.assert_array_equal(obj.generate(params, state, {}, batch, jax.random.key(2), 0), adv)
  value, _ = obj.loss(params, state, {}, batch, adv, jax.random.key(3), 0)
  again_value, _ = defenses.build_objective("again", model, cfg).loss(
    params, state, {}, batch, adv, jax.random.key(3), 0
  )
  np.testing.assert_allclose(value, again_value, rtol=1e-6)


def test_awp_perturbs_the_ase_heads(setup):
  cfg, model, params, state, batch = setup
  obj = defenses.build_objective("again", model, cfg)
  v, active = awp_perturbation(
    obj.loss,
    params,
    state,
    {},
    batch,
    batch["image"],
    jax.random.key(0),
    0,
    gamma=0.005,
    proxy_lr=0.1,
  )
  assert bool(active)
  flat_v = {jax.tree_util.keystr(p): t for p, t in jax.tree_util.tree_flatten_with_path(v)[0]}
  flat_w = {jax.tree_util.keystr(p): t for p, t in jax.tree_util.tree_flatten_with_path(params)[0]}
  heads = [k for k in flat_v if "plugin_" in k]
  assert len(heads) == 4, heads  # kernel and bias at both sites
  for k in heads:
    if k.endswith("['kernel']"):  # ||v|| = gamma ||w|| on every >= 2-D tensor, heads included
      np.testing.assert_allclose(
        jnp.linalg.norm(flat_v[k]), 0.005 * jnp.linalg.norm(flat_w[k]), rtol=1e-4
      )
    else:
      np.testing.assert_array_equal(flat_v[k], 0.0)
  assert defenses.build_objective("again+awp", model, cfg).name == "again+awp"


# --- Sites, configs, training --------------------------------------------------------


def test_sites_default_per_backbone_and_override():
  cfg = make_config()
  # The paper's ResNet placement: "ASE is used in the second last layer of the model"
  # (Fig. 2 caption), i.e. ONE site, the output of layer4 before GAP and the classifier:
  # agad's ``features`` site. Its ResNet-18 results (Table 2, AGAIN-PGD-AT) are Table 5's
  # "Layer4" row, Table 5 moving that one site across layers.
  for name in ("resnet18", "resnet34", "resnet50"):
    cfg.model.name = name
    assert tuple(again_lib.plugins(cfg, K)) == ("features",)
  # The released code's placement (WRN-34-10): the last unit's branch and the final features.
  for name, expected in (
    ("smallcnn", ("stage2.pre_pool", "features")),
    ("wrn34_10", ("stage3.unit[-1].branch", "features")),
    ("preact_resnet18", ("stage4.unit[-1].branch", "features")),
  ):
    cfg.model.name = name
    assert tuple(again_lib.plugins(cfg, K)) == expected
  # Named placements: "code" gives the ResNets the code's two sites, "paper" the one site.
  cfg.objective.again.sites = ("code",)  # --config.objective.again.sites='("code",)'
  for name, expected in (
    ("resnet18", ("stage4.unit[-1].branch", "features")),
    ("wrn34_10", ("stage3.unit[-1].branch", "features")),
  ):
    cfg.model.name = name
    assert tuple(again_lib.plugins(cfg, K)) == expected
  cfg.objective.again.sites = ("paper",)
  assert tuple(again_lib.plugins(cfg, K)) == ("features",)  # wrn34_10
  cfg.model.name = "smallcnn"  # neither the paper nor the code has it: a clear error, up front
  with pytest.raises(
    ValueError, match=r"sites=\('paper',\): .*not for model 'smallcnn'.*name the sites"
  ):
    again_lib._config(cfg)
  cfg.objective.again.sites = ("stem",)
  assert tuple(again_lib.plugins(cfg, K)) == ("stem",)
  d = cfg.to_dict()  # a dict config (a saved config.json) may hold one name or a preset as a string
  d["objective"]["again"]["sites"] = "code"
  d["model"]["name"] = "resnet18"
  assert tuple(again_lib.plugins(ml_collections.ConfigDict(d, type_safe=False), K)) == (
    "stage4.unit[-1].branch",
    "features",
  )
  cfg = make_config()
  cfg.model.name = "mystery_net"
  with pytest.raises(
    ValueError, match="no default sites for model 'mystery_net'.*objective.again.sites"
  ):
    again_lib.plugins(cfg, K)
  cfg.objective.again.sites = ("code",)
  with pytest.raises(ValueError, match=r"sites=\('code',\): .*not for model 'mystery_net'"):
    again_lib.plugins(cfg, K)
  with pytest.raises(NotImplementedError, match="schedule='none'"):
    again_lib.plugins(make_config(schedule="linear"), K)
  with pytest.raises(ValueError, match="alpha=1.5"):
    again_lib.plugins(make_config(alpha=1.5), K)


@pytest.mark.parametrize(
  "dataset,model,preset,sites,channels",
  [
    ("cifar10", "resnet18", (), ("features",), (512,)),  # the paper's one site, after layer4
    ("cifar10", "resnet18", ("code",), ("stage4.unit1.branch", "features"), (512, 512)),
    ("cifar10", "wrn34_10", (), ("stage3.unit4.branch", "features"), (640, 640)),
    ("cifar100", "wrn34_10", (), ("stage3.unit4.branch", "features"), (640, 640)),
  ],
)
def test_big_backbones_get_plugins_at_their_sites(dataset, model, preset, sites, channels):
  import importlib

  config = importlib.import_module(f"configs.{dataset}").get_config(f"{model},again+awp")
  config.objective.again.sites = preset
  info = data_lib.dataset_info(config.data)
  net = defenses.build_model(config, info)
  assert tuple(net.plugins) == sites
  shapes = jax.eval_shape(
    lambda x: net.init(jax.random.key(0), x, train=False),
    jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
  )["params"]
  kernels = [
    leaf.shape
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]
    if "plugin_" in jax.tree_util.keystr(path) and "kernel" in jax.tree_util.keystr(path)
  ]
  assert sorted(kernels) == sorted((c, info.num_classes) for c in channels)
  if model == "wrn34_10":  # the paper's recipe, AWP from epoch 10
    assert config.num_epochs == 200 and tuple(config.optim.boundaries) == (100, 150)
    assert config.objective.awp.gamma == 0.005 and config.objective.awp.warmup_steps == 9 * 382
    assert config.attack.step_size == 2 / 255 and config.attack.eps == 8 / 255


@pytest.mark.skipif(
  not os.path.exists(FMNIST),
  reason="Debian package dataset-fashion-mnist not installed (launch/env.sh installs it)",
)
@pytest.mark.parametrize("spec", ["again", "mart+again", "again+awp"])
@pytest.mark.slow
def test_again_compositions_train_through_the_loop(tmp_path, spec):
  """Finite loss and gradient norm at every step (a NaN-filling gather once gave NaN
  gradients under XLA:CPU's YNN-off code path: the second CI pass runs this test there)."""
  _, lines = train_tiny(tmp_path, spec)
  losses = [l["train/loss"] for l in lines if "train/loss" in l]
  norms = [l["train/grad_norm"] for l in lines if "train/grad_norm" in l]
  assert (
    len(losses) == len(norms) == lines[-1]["step"]
    and all(np.isfinite(losses + norms))
    and min(norms) > 0
  ), lines
  key = "train/again_aux_accuracy" if spec == "mart+again" else "train/aux_accuracy"
  assert any(key in l for l in lines), (spec, sorted(lines[0]))
