"""AFA (agad/defenses/afa.py, afa_stage2.py, _afa_norm.py): branch routing, the stacked ladder attack,
stage II's freezing and fusion, the deployed model, the adaptive losses, the two commands."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax import traverse_util

import agad
from agad import data as data_lib
from agad import defenses
from agad.defenses import afa, afa_stage2, _afa_analysis
from agad.defenses._afa_norm import AFANorm, kept_branches, sown, w0_per_example
from agad.models.layers import MultiBranchBatchNorm
from agad.objectives import base, defaults
from agad.training import loop
from tests.helpers import tiny_config

K = 5


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def _model_and_vars(objective="afa", model="tiny_bn", seed=0, **overrides):
  """A tiny-config model with distinct statistics and affine parameters per BN branch
  (other parameters, the weight generators' included, keep their init)."""
  config = tiny_config(objective, model=model, **overrides)
  config.attack.eps_warmup_steps = 0
  info = data_lib.dataset_info(config.data)
  net = defenses.build_model(config, info)
  x = jax.random.uniform(jax.random.key(seed), (6,) + tuple(info.image_shape))
  variables = net.init(jax.random.key(seed + 1), x, train=False)
  # Make every branch different: perturb BN scale/bias and running statistics per leaf.
  keys = iter(jax.random.split(jax.random.key(seed + 2), 1000))
  noisy = lambda a, s: a + s * jax.random.normal(next(keys), a.shape)
  in_branch = lambda p: any(str(getattr(e, "key", "")).startswith("branch") for e in p)
  params = jax.tree_util.tree_map_with_path(
    lambda p, a: noisy(a, 0.3) if in_branch(p) else a, variables["params"]
  )
  stats = jax.tree_util.tree_map_with_path(
    lambda p, a: (
      a
      if not in_branch(p)
      else jnp.abs(noisy(a, 0.3)) + 0.5
      if p[-1].key == "var"
      else noisy(a, 0.3)
    ),
    variables["batch_stats"],
  )
  y = jnp.arange(6) % 10
  return config, net, params, {"batch_stats": stats}, x, y


class MultiBranchHandTest(parameterized.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_branch_k_alone_updates_its_statistics_hand_values(self):
    mbn = MultiBranchBatchNorm(num_branches=3)
    # Channel 0 holds 1, 2, 3, 4; channel 1 holds 0, 0, 0, 8: mean (2.5, 2), biased var (1.25, 12).
    x = jnp.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 8.0]]).reshape(4, 1, 1, 2)
    v = mbn.init(jax.random.key(0), x, train=False)

    @self.variant
    def step(v, x):
      return mbn.apply(v, x, train=True, norm_ctx={"branch": 1}, mutable=["batch_stats"])

    out, new = step(v, x)
    stats = new["batch_stats"]
    # PyTorch momentum 0.1 from (mean 0, var 1): 0.1 * batch, 0.9 + 0.1 * biased var.
    np.testing.assert_allclose(stats["branch1"]["mean"], [0.25, 0.2], rtol=1e-6)
    np.testing.assert_allclose(stats["branch1"]["var"], [1.025, 2.1], rtol=1e-6)
    for k in (0, 2):
      np.testing.assert_array_equal(stats[f"branch{k}"]["mean"], [0.0, 0.0])
      np.testing.assert_array_equal(stats[f"branch{k}"]["var"], [1.0, 1.0])
    np.testing.assert_allclose(
      out[:, 0, 0, 0], (np.array([1, 2, 3, 4]) - 2.5) / np.sqrt(1.25 + 1e-5), rtol=1e-5
    )


class StageOneTest(parameterized.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_one_hot_mix_in_eval_equals_branch_k_bitwise(self):
    config, net, params, ms, x, _ = _model_and_vars()
    ks = jnp.array([0, 1, 2, 3, 4, 2])

    # Everything is an argument: closed-over constants would be folded at compile time.
    @self.variant
    def mix_logits(params, ms, x, w):
      return base.forward(net, params, ms, x, mode="eval", norm_ctx={"mix": w}).logits

    branch_logits = self.variant(
      lambda k, params, ms, x: (
        base.forward(net, params, ms, x, mode="eval", norm_ctx={"branch": k}).logits
      ),
      static_argnums=(0,),
    )
    mixed = mix_logits(params, ms, x, jax.nn.one_hot(ks, K))
    per_branch = [branch_logits(k, params, ms, x) for k in range(K)]
    for b, k in enumerate(np.asarray(ks)):
      np.testing.assert_array_equal(mixed[b], per_branch[k][b])
    # The branches really differ (else the test proves nothing).
    assert float(jnp.max(jnp.abs(per_branch[0] - per_branch[4]))) > 1e-3

  @parameterized.parameters("pgd_at", "trades", "mart")
  def test_stage_one_loss_updates_each_branch_from_its_own_examples_only(self, base_name):
    config, net, params, ms, x, y = _model_and_vars(**{"objective.afa.base": base_name})
    objective = afa.afa_stage1(net, config)
    batch = {"image": x, "label": y}
    adv = objective.generate(params, ms, {}, batch, jax.random.key(5), 0)
    assert adv.shape == (4 * 6,) + x.shape[1:]
    _, aux = objective.loss(params, ms, {}, batch, adv, jax.random.key(6), 0)
    got = _flat(aux.model_state)
    for k in range(K):
      images = x if k == 0 else adv[(k - 1) * 6 : k * 6]
      alone = base.forward(net, params, ms, images, mode="train", norm_ctx={"branch": k})
      want = _flat(alone.model_state)
      for path, value in got.items():
        if f"branch{k}/" in path:
          np.testing.assert_allclose(value, want[path], rtol=1e-6, atol=1e-7, err_msg=path)
    assert set(aux.passes) >= {"clean", "adv", "adv1", "adv4"}

  @parameterized.parameters(("pgd_at", "ce"), ("trades", "kl"))
  def test_stacked_ladder_attack_equals_separate_attacks_with_the_same_keys(self, base_name, loss):
    config, net, params, ms, x, y = _model_and_vars(
      **{"objective.afa.base": base_name, "attack.steps": 3}
    )
    cfg = defaults.objective_config(config, "afa", afa.DEFAULTS)
    eps, step = afa.ladder_radii(config, cfg)
    np.testing.assert_allclose(eps, np.array([0, 1, 2, 4, 8]) / 8 * 0.1)  # Fashion-MNIST ladder
    attack = defaults.TrainingAttack(net, config, {"random_start": "uniform"})
    key = jax.random.key(11)
    stacked = afa.ladder_attack(attack, params, ms, x, y, key, eps=eps, step_size=step, loss=loss)
    for k in range(1, K):
      alone = attack(
        params,
        ms,
        x,
        y,
        afa.branch_key(key, k),
        loss=loss,
        eps=float(eps[k]),
        step_size=float(step[k]),
        norm_ctx={"branch": k},
      )
      np.testing.assert_array_equal(stacked[(k - 1) * 6 : k * 6], alone)
      delta = np.abs(np.asarray(alone - x)).reshape(6, -1).max(-1)
      assert np.all(delta <= eps[k] + 1e-6) and np.all(delta > 0.5 * eps[k])

  def test_bad_ladders_and_bases_are_refused_with_the_fix(self):
    config, net, *_ = _model_and_vars()
    config.objective.afa.ladder = (0.1, 0.2, 0.3, 0.4, 1.0)
    with pytest.raises(ValueError, match="must start at 0"):
      afa.afa_stage1(net, config)
    config.objective.afa.ladder = (0.0, 0.5, 1.0)
    with pytest.raises(ValueError, match="num_branches=5"):
      afa.afa_stage1(net, config)
    config.objective.afa.ladder = afa.DEFAULTS.ladder
    config.objective.afa.base = "alp"
    with pytest.raises(ValueError, match="'alp' is not one of"):
      afa.afa_stage1(net, config)


class AFANormTest(parameterized.TestCase):
  def _norm(self, **kw):
    m = AFANorm(num_branches=K, **kw)
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
    v = m.init(jax.random.key(1), x, train=False)
    stats = {
      "branch0": {"mean": jnp.array([1.0, -1.0]), "var": jnp.array([4.0, 1.0])},
      "branch4": {"mean": jnp.array([0.0, 2.0]), "var": jnp.array([1.0, 9.0])},
      "wg": v["batch_stats"]["wg"],
    }
    return m, x, {"params": v["params"], "batch_stats": stats}

  @chex.variants(with_jit=True, without_jit=True)
  def test_fixed_w0_is_the_convex_combination_of_the_two_kept_branches(self):
    m, x, v = self._norm()
    out = self.variant(lambda x: m.apply(v, x, train=False, norm_ctx={"w0": 0.25}))(x)
    bn0 = (x - jnp.array([1.0, -1.0])) / jnp.sqrt(jnp.array([4.0, 1.0]) + 1e-5)
    bn4 = (x - jnp.array([0.0, 2.0])) / jnp.sqrt(jnp.array([1.0, 9.0]) + 1e-5)
    np.testing.assert_allclose(out, 0.25 * bn0 + 0.75 * bn4, rtol=1e-5, atol=1e-6)
    assert set(v["params"]) == {"branch0", "branch4", "wg"}  # middle branches dropped

  @parameterized.parameters(("scalar", 1), ("channel", 2))
  def test_w0_in_open_unit_interval_and_frozen_statistics_in_training(self, wg_out, width):
    m, x, v = self._norm(wg_out=wg_out)
    x = 30.0 * x  # large inputs: W0 must still stay strictly inside (0, 1)
    out, new = m.apply(v, x, train=True, mutable=["batch_stats", "aux"])
    w0 = sown(new["aux"])[0]
    assert w0.shape == (3, width)
    assert np.all((np.asarray(w0) > 0) & (np.asarray(w0) < 1))
    for k in ("branch0", "branch4"):
      for s in ("mean", "var"):
        np.testing.assert_array_equal(new["batch_stats"][k][s], v["batch_stats"][k][s])
    # The WG's own BN trains (its statistics move).
    assert not np.array_equal(
      new["batch_stats"]["wg"]["bn0"]["mean"], v["batch_stats"]["wg"]["bn0"]["mean"]
    )
    # Training mode with frozen statistics = eval mode of the branches at the same W0.
    fused = m.apply(v, x, train=False, norm_ctx={"w0": w0})
    np.testing.assert_allclose(out, fused, rtol=1e-5, atol=1e-5)

  def test_routing_errors_name_the_fix(self):
    m, x, v = self._norm()
    with pytest.raises(ValueError, match="keeps branches 0 and 4 only"):
      m.apply(v, x, train=False, norm_ctx={"branch": 2})
    with pytest.raises(ValueError, match="unknown"):
      m.apply(v, x, train=False, norm_ctx={"mix": jnp.ones((3, 5))})
    assert kept_branches(5, (0, -1)) == (0, 4)
    with pytest.raises(ValueError, match="twice"):
      kept_branches(5, (4, -1))


class PerStageWeightGeneratorTest(parameterized.TestCase):
  @parameterized.parameters(
    # tiny_bn: stem_bn (group "stem"), unit bn1/bn2 (group "stage1"); its stem conv has 8
    # channels, the unit's input too.
    ("tiny_bn", "stage", {"norm_hook_stem": 8, "norm_hook_stage1": 8}, 3),
    # smallcnn_bn: stage 1 reads the 1-channel image, stage 2 the 32-channel pooled map.
    ("smallcnn_bn", "stage", {"norm_hook_stage1": 1, "norm_hook_stage2": 32}, 4),
  )
  def test_one_wg_per_group_reading_the_group_input(self, model, per, hooks, layers):
    shape = {"data.image_shape": (16, 16, 1)}  # smallcnn needs >= 14 pixels a side
    config, net, params, ms, x, y = _model_and_vars(
      "afa_stage2", model=model, **shape, **{"objective.afa_stage2.wg_per": per}
    )
    flat = _flat(params)
    wg_roots = {k.split("/wg/")[0] for k in flat if "/wg/" in k}
    assert wg_roots == set(hooks)  # no AFANorm layer owns a WG
    for hook, channels in hooks.items():
      assert flat[f"{hook}/wg/conv0/kernel"].shape[2] == channels
    out = base.forward(net, params, ms, x, mode="eval")
    assert len(sown(out.aux)) == len(hooks)
    # The per-layer option: one WG inside each of the model's BN layers.
    config, net_l, params_l, ms_l, *_ = _model_and_vars(
      "afa_stage2", model=model, **shape, **{"objective.afa_stage2.wg_per": "layer"}
    )
    assert net_l.norm_hook is None
    assert len(sown(base.forward(net_l, params_l, ms_l, x, mode="eval").aux)) == layers

  def test_stage_weight_reaches_every_layer_of_its_stage_only(self):
    config, net, params, ms, x, y = _model_and_vars(
      "afa_stage2", model="smallcnn_bn", **{"data.image_shape": (16, 16, 1)}
    )
    flat = _flat(params)  # SmallCNN's classifier starts at zero: give the logits a signal
    flat["classifier/kernel"] = jax.random.normal(
      jax.random.key(9), flat["classifier/kernel"].shape
    )
    params = traverse_util.unflatten_dict(flat, sep="/")
    fwd = lambda p: base.forward(net, p, ms, x, mode="eval")
    out = fwd(params)
    # W0 = 1 on every hook (huge bias on the WG's last Linear) is BN_0 everywhere.
    flat = _flat(params)
    for hook in ("norm_hook_stage1", "norm_hook_stage2"):
      flat[f"{hook}/wg/fc1/bias"] = flat[f"{hook}/wg/fc1/bias"] + 1e4
    ones = fwd(traverse_util.unflatten_dict(flat, sep="/"))
    branch0 = base.forward(net, params, ms, x, mode="eval", norm_ctx={"branch": 0})
    np.testing.assert_allclose(ones.logits, branch0.logits, rtol=1e-5, atol=1e-5)
    # A norm_ctx override bypasses the hooks (w0 = 1 is branch 0 as well).
    np.testing.assert_allclose(
      base.forward(net, params, ms, x, mode="eval", norm_ctx={"w0": 1.0}).logits,
      branch0.logits,
      rtol=1e-5,
      atol=1e-5,
    )
    # Saturating stage 1's WG alone changes the logits, and differs from saturating both.
    flat = _flat(params)
    flat["norm_hook_stage1/wg/fc1/bias"] = flat["norm_hook_stage1/wg/fc1/bias"] + 1e4
    one_stage = fwd(traverse_util.unflatten_dict(flat, sep="/"))
    assert not np.allclose(one_stage.logits, out.logits) and not np.allclose(
      one_stage.logits, ones.logits
    )
    w0 = sown(one_stage.aux)
    np.testing.assert_allclose(w0[0], 1.0)  # stage 1 (sorted by path)
    # Stage 2 keeps its own WG's weight (its input changed with stage 1's fusion).
    assert np.all((np.asarray(w0[1]) > 0.01) & (np.asarray(w0[1]) < 0.99))

  def test_bad_wg_settings_are_refused(self):
    with pytest.raises(ValueError, match="wg_per='layer'"):
      _model_and_vars("afa_stage2", **{"objective.afa_stage2.wg_out": "channel"})
    with pytest.raises(ValueError, match="wg_per='row' is not one of"):
      _model_and_vars("afa_stage2", **{"objective.afa_stage2.wg_per": "row"})
    m = AFANorm(own_wg=False)
    x = jnp.ones((2, 3, 3, 4))
    with pytest.raises(ValueError, match="no weight generator of its own"):
      m.init(jax.random.key(0), x, train=False)


def _stage2_objective(init_workdir="runs/none", **kw):
  config, net, params, ms, x, y = _model_and_vars(
    "afa_stage2", **{"init.workdir": init_workdir, **kw}
  )
  return config, net, params, ms, x, y, afa_stage2.afa_stage2(net, config)


class AdaptiveLossTest(parameterized.TestCase):
  def test_seven_variants_equal_a_ce_plus_b_bce_by_hand(self):
    config, net, params, ms, x, y, objective = _stage2_objective()
    variants = objective.adaptive_loss(net, {"params": params, **ms})
    assert sorted(variants) == sorted(
      ["ce10_bce1", "ce5_bce1", "ce2_bce1", "ce1_bce1", "ce1_bce2", "ce1_bce5", "ce1_bce10"]
    )
    out = base.forward(net, params, ms, x, mode="eval")
    w0s = sown(out.aux)
    assert len(w0s) == 2  # tiny_bn, one WG per norm group: the stem's BN, stage 1
    ce = -jnp.take_along_axis(jax.nn.log_softmax(out.logits), y[:, None], 1)[:, 0]
    bce = sum(-jnp.log(1.0 - w[:, 0]) for w in w0s) / 2
    np.testing.assert_allclose(variants["ce1_bce5"](x, y), ce + 5 * bce, rtol=1e-5)
    np.testing.assert_allclose(variants["ce10_bce1"](x, y), 10 * ce + bce, rtol=1e-5)

  def test_ascending_the_bce_term_raises_minus_log_one_minus_w0(self):
    config, net, params, ms, x, y, _ = _stage2_objective(
      **{"objective.afa_stage2.adaptive_ratios": "0:1"}
    )
    objective = afa_stage2.afa_stage2(net, config)
    ((name, loss),) = objective.adaptive_loss(net, {"params": params, **ms}).items()
    assert name == "ce0_bce1"
    # BCE(W0, 0) from the sown weights: -log(1 - W0); ascending it raises W0 (towards the
    # clean branch) on average over layers, weighted by 1 / (1 - W0).
    bce = lambda z: (
      sum(-jnp.log1p(-w[:, 0]) for w in sown(base.forward(net, params, ms, z, mode="eval").aux)) / 2
    )
    x = 0.25 + 0.5 * x  # away from the [0, 1] box: a small step is a pure gradient step
    np.testing.assert_allclose(loss(x, y), bce(x), rtol=1e-5)
    g = jax.grad(lambda z: jnp.sum(loss(z, y)))(x)
    moved = x + 1e-3 * jnp.sign(g)
    assert np.all(np.asarray(bce(moved)) > np.asarray(bce(x)))

  def test_stage_two_refuses_to_run_unfrozen(self):
    config, net, *_ = _model_and_vars("afa_stage2")
    config.init.workdir = ""
    with pytest.raises(ValueError, match="init.workdir=<stage-I workdir>"):
      afa_stage2.afa_stage2(net, config)


def test_recipes_and_config_names():
  from configs import cifar10, fashion_mnist, svhn

  c = cifar10.get_config("wrn28_10,afa_stage2")
  assert (c.num_epochs, c.optim.lr, tuple(c.optim.boundaries), c.optim.decay_factor) == (
    20,
    0.01,
    (10,),
    0.1,
  )
  assert (
    c.init.freeze == afa_stage2.STAGE2_FREEZE and c.init.keep_init == afa_stage2.STAGE2_KEEP_INIT
  )
  c = cifar10.get_config("wrn28_10,afa")
  assert (c.num_epochs, c.optim.lr, tuple(c.optim.boundaries), c.init.freeze) == (
    100,
    0.1,
    (75, 90),
    "",
  )
  c = svhn.get_config("wrn16_8,afa_stage2")
  assert (c.num_epochs, c.optim.lr, tuple(c.optim.boundaries)) == (20, 0.001, (10,))
  assert svhn.get_config("wrn16_8,afa").optim.lr == 0.01
  c = fashion_mnist.get_config("smallcnn_bn,afa_stage2")
  assert (c.num_epochs, c.optim.lr, c.attack.eps_warmup_steps) == (1, 0.005, 0)
  import re

  frozen = lambda p: bool(re.search(afa_stage2.STAGE2_FREEZE, p))
  assert frozen("stage1_bn0/branch0/scale") and frozen("stage2_unit0/bn1/branch4/bias")
  assert frozen("classifier/kernel") and not frozen("stage1_bn0/wg/conv0/kernel")
  assert not frozen("stage2_unit0/bn1/wg/fc1/bias")
  assert not frozen("norm_hook_stage2/wg/conv0/kernel")  # per-stage WGs (the default) train


def _fashion_mnist_smoke(objective, workdir, **overrides):
  """``configs/fashion_mnist.py:smallcnn_bn,<objective>,smoke --config.stop_after_steps=2``."""
  from configs import fashion_mnist

  config = fashion_mnist.get_config(f"smallcnn_bn,{objective},smoke")
  config.stop_after_steps = 2
  config.checkpoint.async_save = False
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return loop.Trainer(config, workdir)


@pytest.mark.slow
def test_stage_one_then_stage_two_fashion_mnist_smoke_through_the_trainer(tmp_path):
  """The two Fashion-MNIST commands (smoke): stage II keeps every frozen parameter and
  statistic bitwise, trains the WGs only, and agad.load(...).logits_fn is the eval-mode
  training forward of the deployed fusion model."""
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  first = _fashion_mnist_smoke("afa", one)
  assert first.exp.objective.name == "afa" and first.config.attack.eps == 0.1
  first.run()
  trainer = _fashion_mnist_smoke("afa_stage2", two, **{"init.workdir": one})
  assert trainer.config.init.freeze == afa_stage2.STAGE2_FREEZE
  start = _flat(trainer.initial_state().params)
  final = trainer.run()
  src = agad.load(one, "latest").variables
  src_params, src_stats = _flat(src["params"]), _flat(src["batch_stats"])
  params, stats = _flat(final.params), _flat(final.model_state["batch_stats"])
  wg = [p for p in params if "/wg/" in p]
  assert wg and all(p not in src_params for p in wg)
  for path, value in params.items():
    if "/wg/" not in path:
      np.testing.assert_array_equal(value, src_params[path], err_msg=path)
  for path, value in stats.items():
    if "/wg/" not in path:
      np.testing.assert_array_equal(value, src_stats[path], err_msg=path)
  assert not any("branch1" in p or "branch3" in p for p in params)
  assert any(not np.array_equal(params[p], start[p]) for p in wg)  # the WGs trained

  loaded = agad.load(two, "latest")
  assert loaded.step == 2
  x = jax.random.uniform(jax.random.key(3), (5, 28, 28, 1))
  out = base.forward(loaded.model, final.params, final.model_state, x, mode="eval")
  np.testing.assert_array_equal(loaded.logits_fn(x), out.logits)
  w0 = w0_per_example(out)
  assert np.all((np.asarray(w0) > 0) & (np.asarray(w0) < 1))
  assert len(sown(out.aux)) == 2  # smallcnn_bn: two stages, one WG each (wg_per='stage')
  branch0 = base.forward(
    loaded.model, final.params, final.model_state, x, mode="eval", norm_ctx={"branch": 0}
  ).logits
  assert float(jnp.max(jnp.abs(branch0 - out.logits))) > 0  # the fusion is what runs
  assert len(loaded.objective().adaptive_loss(loaded.model, loaded.variables)) == 7
  fig6 = _afa_analysis.fusion_weight_vs_eps(
    loaded.model,
    loaded.variables,
    x,
    jnp.arange(5),
    jax.random.key(4),
    eps_values=(0.0, 0.05, 0.1),
    steps=2,
  )
  assert fig6["w1"].shape == (3, 5) and np.all((fig6["w1"] > 0) & (fig6["w1"] < 1))
  np.testing.assert_allclose(fig6["w1"][0], 1.0 - np.asarray(w0), rtol=1e-5, atol=1e-6)
  assert -1.0 <= fig6["spearman"] <= 1.0
  # The objective declares the same quantity for launch.evaluate --preset=ladder.
  declared = loaded.objective().analysis(loaded.model, loaded.variables)(
    x, jnp.arange(5), jax.random.key(4), (0.0,)
  )
  assert declared["name"] == "fusion_weight" and declared["y"].shape == (1, 5)
  np.testing.assert_allclose(declared["y"][0], 1.0 - np.asarray(w0), rtol=1e-5, atol=1e-6)


def test_spearman_hand_values():
  # Ties share their average rank: (1, 1, 2) -> ranks (1.5, 1.5, 3).
  np.testing.assert_array_equal(
    _afa_analysis.average_ranks(np.array([1.0, 1.0, 2.0])), [1.5, 1.5, 3.0]
  )
  assert _afa_analysis.spearman([0, 1, 2, 3], [10, 20, 25, 100]) == pytest.approx(1.0)
  assert _afa_analysis.spearman([0, 1, 2, 3], [4, 3, 2, 1]) == pytest.approx(-1.0)
  # x = (1, 2, 3), y = (1, 3, 2): d = (0, -1, 1), rho = 1 - 6 * 2 / (3 * 8) = 0.5.
  assert _afa_analysis.spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)


@pytest.mark.slow
def test_fixed_mix_sweep_clean_rows_and_attacked_rows_by_hand():
  """Clean rows equal each routing's own argmax; attacked rows equal PGD through that
  routing with the documented key; best_fixed is the column maximum."""
  config, net, params, ms, x, y = _model_and_vars()
  variables = {"params": params, **ms}
  mixes = _afa_analysis.default_mixes(K)
  assert list(mixes)[:K] == [f"BN_{k}" for k in range(K)] and len(mixes) == K + 3
  np.testing.assert_allclose(mixes["0.25 BN_0 + 0.75 BN_4"], [0.25, 0, 0, 0, 0.75])
  key = jax.random.key(7)
  out = _afa_analysis.fixed_mix_sweep(
    net, variables, x, y, key, mixes=mixes, eps_values=(0.0, 0.3), steps=3
  )
  chex.assert_shape(out["correct"], (K + 3, 2, 6))
  for k in range(K):
    logits = base.forward(net, params, ms, x, mode="eval", norm_ctx={"branch": k}).logits
    np.testing.assert_array_equal(out["correct"][k, 0], np.asarray(jnp.argmax(logits, -1) == y))
  w = jnp.broadcast_to(mixes["0.5 BN_0 + 0.5 BN_4"], (6, K))
  fn = base.logits_fn_for(net, params, ms, mode="eval", norm_ctx={"mix": w})
  xa = afa.pgd_lib.pgd(
    fn, x, y, jax.random.fold_in(key, 1), eps=0.3, step_size=2.5 * 0.3 / 3, steps=3
  )
  np.testing.assert_array_equal(out["correct"][K + 1, 1], np.asarray(jnp.argmax(fn(xa), -1) == y))
  np.testing.assert_allclose(out["best_fixed"], out["correct"].mean(-1).max(0))
  with pytest.raises(ValueError, match="one weight per branch"):
    _afa_analysis.fixed_mix_sweep(
      net, variables, x, y, key, mixes={"bad": np.ones((2, K))}, eps_values=(0.0,)
    )
