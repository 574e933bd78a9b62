"""What the core gives a defense: passes and taps, plug-in rng, attack overrides, smoothing."""

import functools

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
from agad.defenses import cas as cas_module
from agad.models.layers import MultiBranchBatchNorm
from agad.objectives import base, defaults
from agad.objectives.alp import alp_loss
from agad.objectives.mart import mart_loss
from agad.objectives.pgd_at import pgd_at
from agad.objectives.standard import standard
from agad.objectives.trades import trades_loss
from tests.helpers import objective_defaults

B, H, W, C, K = 6, 8, 8, 1, 10


def make_config():
  c = ml_collections.ConfigDict()
  c.objective = objective_defaults()
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


def setup_model(spec, plugins=None):
  cfg = make_config()
  plugins = defenses.plugins_for(spec, cfg, K) if plugins is None else plugins
  model = models.build_model(
    "tiny_bn", num_classes=K, mean=(0.5,), std=(0.25,), plugins=plugins or None
  )
  x = jax.random.uniform(jax.random.key(0), (B, H, W, C))
  y = jnp.arange(B) % K
  variables = model.init(jax.random.key(1), x, train=False, labels=y)
  state = {"batch_stats": jax.tree.map(lambda s: s + 0.2, variables["batch_stats"])}
  return cfg, model, variables["params"], state, {"image": x, "label": y}


# The loss of each objective recomputed from its own passes' logits (hand formula).
FORMULAS = {
  "pgd_at": lambda p, y, c: base.cross_entropy_mean(p["adv"].logits, y),
  "trades": lambda p, y, c: trades_loss(p["clean"].logits, p["adv"].logits, y, beta=6.0),
  "mart": lambda p, y, c: mart_loss(p["clean"].logits, p["adv"].logits, y, beta=6.0),
  "alp": lambda p, y, c: alp_loss(
    p["clean"].logits, p["adv"].logits, y, weight=0.5, label_smoothing=0.1
  ),
  "cas": lambda p, y, c: jnp.mean(
    cas_module.cas_per_example(p["adv"].logits, p["adv"].aux, y, 2.0)
  ),
  "trades+awp": lambda p, y, c: trades_loss(p["clean"].logits, p["adv"].logits, y, beta=6.0),
  # The +cas transform: CAS's aux term on TRADES' own adversarial pass.
  "trades+cas": lambda p, y, c: (
    trades_loss(p["clean"].logits, p["adv"].logits, y, beta=6.0)
    + 2.0 * jnp.mean(attack_losses.cross_entropy(cas_module.aux_logits(p["adv"].aux)[0], y))
  ),
}


@pytest.mark.parametrize("spec", sorted(FORMULAS))
def test_loss_equals_its_formula_on_its_own_passes_and_taps_are_the_sown_values(spec):
  cfg, model, params, state, batch = setup_model(spec)
  obj = defenses.build_objective(spec, model, cfg)
  adv = obj.generate(params, state, {}, batch, jax.random.key(2), 0)
  value, aux = jax.jit(obj.loss)(params, state, {}, batch, adv, jax.random.key(3), 0)
  assert isinstance(aux, base.LossAux)
  np.testing.assert_allclose(value, FORMULAS[spec](aux.passes, batch["label"], cfg), rtol=1e-6)
  assert "adv" in aux.passes
  for name, out in aux.passes.items():
    assert {"stem", "stage1.unit0.branch", "stage1.unit0", "features", "embedding"} <= set(
      out.taps
    ), name
    chex.assert_shape(out.taps["embedding"], (B, 8))
  if spec != "trades+awp":  # AWP's passes are at w + v, checked below
    images = adv if spec != "alp" else adv  # ALP's "adv" half is the adv rows of one [x; x'] pass
    if spec == "alp":
      ref = base.forward(
        model,
        params,
        state,
        jnp.concatenate([batch["image"], adv]),
        mode="train",
        labels=jnp.concatenate([batch["label"]] * 2),
        taps=("embedding",),
      ).taps["embedding"][B:]
    else:
      ref = base.forward(
        model, params, state, images, mode="train", labels=batch["label"], taps=("embedding",)
      ).taps["embedding"]
    np.testing.assert_allclose(aux.passes["adv"].taps["embedding"], ref, rtol=1e-5, atol=1e-6)


def test_awp_returns_the_inner_passes_at_the_perturbed_weights():
  cfg, model, params, state, batch = setup_model("trades+awp")
  obj = defenses.build_objective("trades+awp", model, cfg)
  adv = obj.generate(params, state, {}, batch, jax.random.key(2), 0)
  value, aux = obj.loss(params, state, {}, batch, adv, jax.random.key(3), 0)
  _, at_w = defenses.build_objective("trades", model, cfg).loss(
    params, state, {}, batch, adv, jax.random.key(3), 0
  )
  assert float(jnp.abs(aux.passes["adv"].logits - at_w.passes["adv"].logits).max()) > 1e-6
  np.testing.assert_array_equal(
    value,
    trades_loss(aux.passes["clean"].logits, aux.passes["adv"].logits, batch["label"], beta=6.0),
  )


def test_add_terms_adds_a_differentiable_term_on_a_tap_without_a_second_pass():
  cfg, model, params, state, batch = setup_model("pgd_at")
  inner = pgd_at(model, cfg)
  weight = 0.3
  term = lambda p, passes, b, k, s: (
    weight * jnp.mean(passes["adv"].taps["embedding"] ** 2),
    {"penalty": jnp.float32(1.0)},
  )
  outer = base.add_terms(inner, "pen", term)
  assert outer.name == "pgd_at+pen" and outer.generate is inner.generate
  adv = inner.generate(params, state, {}, batch, jax.random.key(2), 0)

  def reference(p):
    out = base.forward(
      model, p, state, adv, mode="train", labels=batch["label"], taps=("embedding",)
    )
    return base.cross_entropy_mean(out.logits, batch["label"]) + weight * jnp.mean(
      out.taps["embedding"] ** 2
    )

  (value, aux), grads = jax.value_and_grad(outer.loss, has_aux=True)(
    params, state, {}, batch, adv, jax.random.key(3), 0
  )
  np.testing.assert_allclose(value, reference(params), rtol=1e-6)
  chex.assert_trees_all_close(grads, jax.grad(reference)(params), rtol=1e-5, atol=1e-7)
  assert aux.metrics["penalty"] == 1.0 and "adv_accuracy" in aux.metrics
  # One forward pass: the jaxpr of the loss has as many convolutions as pgd_at's own loss.
  count = lambda fn: str(
    jax.make_jaxpr(fn)(params, state, {}, batch, adv, jax.random.key(3), 0)
  ).count("conv_general")
  assert count(outer.loss) == count(inner.loss)


def test_forward_taps_reject_unknown_sites():
  _, model, params, state, batch = setup_model("pgd_at")
  out = base.forward(model, params, state, batch["image"], mode="eval", taps=("stem", "features"))
  assert set(out.taps) == {"stem", "features"}
  with pytest.raises(KeyError, match="'featurez'.*features"):
    base.forward(model, params, state, batch["image"], mode="eval", taps=("featurez",))


class NoisePlugin(nn.Module):
  """Adds U(0, 1) noise from the plug-in rng in training passes; sows what it drew."""

  @nn.compact
  def __call__(self, x, *, train, labels=None):
    if train and self.has_rng(base.PLUGIN_RNG):
      noise = jax.random.uniform(self.make_rng(base.PLUGIN_RNG), x.shape[:1])
    else:
      noise = jnp.full(x.shape[:1], -1.0)  # deterministic: no rng
    self.sow("aux", "noise", noise)
    return x + noise.reshape((-1,) + (1,) * (x.ndim - 1))


def test_plugins_get_a_fresh_rng_per_pass_and_step_and_none_in_eval():
  cfg, model, params, state, batch = setup_model("trades", plugins={"features": NoisePlugin})
  obj = defenses.build_objective("trades", model, cfg)
  adv = batch["image"]
  noise = lambda aux, name: np.asarray(aux.passes[name].aux["plugin_features"]["noise"][0])
  _, a1 = obj.loss(params, state, {}, batch, adv, jax.random.key(5), 0)
  _, a1_again = obj.loss(params, state, {}, batch, adv, jax.random.key(5), 0)
  _, a2 = obj.loss(params, state, {}, batch, adv, jax.random.key(6), 1)  # the next step's key
  assert (noise(a1, "clean") >= 0).all() and (noise(a1, "adv") >= 0).all()
  assert not np.array_equal(noise(a1, "clean"), noise(a1, "adv"))  # per pass
  assert not np.array_equal(noise(a1, "adv"), noise(a2, "adv"))  # per step
  np.testing.assert_array_equal(noise(a1, "adv"), noise(a1_again, "adv"))  # reproducible
  out = base.forward(model, params, state, adv, mode="eval", rng=jax.random.key(0))
  np.testing.assert_array_equal(out.aux["plugin_features"]["noise"][0], -1.0)  # eval: no rng


def test_training_attack_takes_per_example_eps_and_norm_ctx():
  cfg = make_config()
  norm = functools.partial(MultiBranchBatchNorm, num_branches=2)
  model = models.build_model("tiny_bn", num_classes=K, mean=(0.5,), std=(0.25,), norm=norm)
  x = jax.random.uniform(jax.random.key(0), (B, H, W, C))
  y = jnp.arange(B) % K
  variables = model.init(jax.random.key(1), x, train=False)
  params = variables["params"]
  # Make branch 1 different from branch 0 so that routing matters.
  stats = jax.tree_util.tree_map_with_path(
    lambda path, v: v + 0.5 if "branch1" in jax.tree_util.keystr(path) else v,
    variables["batch_stats"],
  )
  state = {"batch_stats": stats}
  attack = defaults.TrainingAttack(model, cfg, None)
  eps = jnp.array([0.0, 0.02, 0.05, 0.1, 0.0, 0.1])
  key = jax.random.key(3)
  adv = attack(params, state, x, y, key, eps=eps, step_size=eps / 2, norm_ctx={"branch": 1})
  dist = jnp.abs(adv - x).max(axis=(1, 2, 3))
  assert bool(jnp.all(dist <= eps + 1e-6)) and float(dist[3]) > 0.05
  np.testing.assert_array_equal(adv[jnp.array([0, 4])], x[jnp.array([0, 4])])
  logits_fn = base.logits_fn_for(model, params, state, mode="eval", norm_ctx={"branch": 1})
  expected = pgd_lib.pgd(
    logits_fn,
    x,
    y,
    key,
    eps=eps,
    step_size=eps / 2,
    steps=2,
    random_start="uniform",
    driver="unroll",
  )
  np.testing.assert_array_equal(adv, expected)
  branch0 = attack(params, state, x, y, key, eps=eps, step_size=eps / 2)
  assert not np.array_equal(adv, branch0)


def test_label_smoothing_over_the_other_classes():
  logits = jnp.array([[2.0, 0.5, -1.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
  labels = jnp.array([0, 2])
  logp = jax.nn.log_softmax(logits)
  s = 0.5
  target = np.full((2, 4), s / 3)
  target[0, 0] = target[1, 2] = 1 - s
  np.testing.assert_allclose(
    attack_losses.cross_entropy(logits, labels, label_smoothing=s, smoothing="others"),
    -(target * logp).sum(-1),
    rtol=1e-6,
  )
  target_all = np.full((2, 4), s / 4)
  target_all[0, 0] = target_all[1, 2] = 1 - s + s / 4
  np.testing.assert_allclose(
    attack_losses.cross_entropy(logits, labels, label_smoothing=s),
    -(target_all * logp).sum(-1),
    rtol=1e-6,
  )
  with pytest.raises(ValueError, match="'other'"):
    attack_losses.cross_entropy(logits, labels, label_smoothing=s, smoothing="other")
  # The standard objective takes it from its config (AGKD-BML's teacher: 0.5 over the others).
  cfg, model, params, state, batch = setup_model("standard")
  cfg.objective.standard.label_smoothing = 0.5
  cfg.objective.standard.smoothing = "others"
  value, aux = standard(model, cfg).loss(
    params, state, {}, batch, batch["image"], jax.random.key(0), 0
  )
  expected = jnp.mean(
    attack_losses.cross_entropy(
      aux.passes["clean"].logits, batch["label"], label_smoothing=0.5, smoothing="others"
    )
  )
  np.testing.assert_array_equal(value, expected)
