"""ATAT: each variant's loss on hand values and against an independent recomputation
(``agad.attention.tap_grad``), the one-pass Grad-CAM against the attention toolkit, the
gradient through the student's Grad-CAM against finite differences (and against the
gradient that ignores the second-order path), the frozen teacher (unchanged, not
checkpointed, checked before training, resume with another refused), an end-to-end
teacher -> student run through ``loop.Trainer`` and the Fashion-MNIST two-command
pipeline through ``launch.train``."""

import json
import logging
import math
import os
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import agad
from agad import attention as at
from agad import checkpoint
from agad.attacks import losses as attack_losses
from agad.defenses import atat
from agad.models import build_model
from agad.objectives import base
from agad.training import loop
from tests.helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"
LN2, LN3, LN43 = math.log(2), math.log(3), math.log(4 / 3)

# Two examples, K = 2, labels [0, 1]. Student logits over [x; x']:
#   clean [0, 0], [0, 0]  -> CE ln 2, ln 2;   adv [ln 3, 0], [0, 0] -> CE ln(4/3), ln 2.
LOGITS = jnp.array([[0.0, 0.0], [0.0, 0.0], [LN3, 0.0], [0.0, 0.0]])
LABELS = jnp.array([0, 1])
CE = (LN2 + LN2 + LN43 + LN2) / 4
# Site "features" (2x2 maps): teacher T, student rows [S(x_0), S(x_1), S(x'_0), S(x'_1)].
T_FEAT = jnp.array([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
S_FEAT = jnp.array(
  [
    [[1.0, 0.0], [0.0, 0.0]],  # = T_0: distance 0
    [[0.0, 2.0], [0.0, 0.0]],  # T_1 = 0: L2 2, squared sum 4
    [[0.0, 0.0], [1.0, 1.0]],  # T_0 - S = [1, 0, -1, -1]: L2 sqrt 3, squared sum 3
    [[0.0, 0.0], [0.0, 0.0]],
  ]
)  # = T_1
# Site "stem" (1x1 maps): T = 0, S = 3 everywhere.
T_STEM, S_STEM = jnp.zeros((2, 1, 1)), jnp.full((4, 1, 1), 3.0)
S_MAPS, T_MAPS = {"features": S_FEAT, "stem": S_STEM}, {"features": T_FEAT, "stem": T_STEM}


class LossOnHandValuesTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_paper_sums_sites_of_per_example_l2_norms_averaged_over_the_batch(self):
    fn = self.variant(
      lambda s, t, z: atat.atat_loss(
        "paper", z, LABELS, student_maps=s, teacher_maps=t, lam_at=2.0, lam_lp=0.5
      )
    )
    value, m = fn(S_MAPS, T_MAPS, LOGITS)
    # features: mean_b(||T - S(x')|| + ||T - S(x)||) = ((sqrt3 + 0) + (0 + 2)) / 2; stem: (3 + 3 + 3 + 3) / 2.
    att = (math.sqrt(3) + 2) / 2 + 6.0
    lp = (LN3 + 0.0) / 2  # mean_b ||z(x) - z(x')||_2, not squared
    np.testing.assert_allclose(
      [m["atat_ce"], m["atat_attention"], m["atat_logit"]], [CE, att, lp], rtol=1e-6
    )
    np.testing.assert_allclose(value, CE + 2.0 * att + 0.5 * lp, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_code_cifar10_is_two_logit_mses_to_the_teacher(self):
    fn = self.variant(lambda z, t: atat.atat_loss("code_cifar10", z, LABELS, teacher_logits=t))
    t = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    value, m = fn(LOGITS, t)
    mse_clean = (1 + 0 + 0 + 1) / 4  # mean over B*K of (z_S(x) - z_T(x))^2
    mse_adv = ((LN3 - 1) ** 2 + 0 + 0 + 1) / 4
    np.testing.assert_allclose(m["atat_logit"], mse_clean + mse_adv, rtol=1e-6)
    np.testing.assert_allclose(value, CE + mse_clean + mse_adv, rtol=1e-6)
    assert float(m["atat_attention"]) == 0.0  # the code optimises no attention term

  @chex.variants(with_jit=True, without_jit=True)
  def test_code_cifar100_is_two_map_mses_per_site(self):
    fn = self.variant(
      lambda s, t, z: atat.atat_loss(
        "code_cifar100", z, LABELS, student_maps=s, teacher_maps=t, lam_at=3.0
      )
    )
    value, m = fn(S_MAPS, T_MAPS, LOGITS)
    # features: mean over B*H*W = 8 of (S(x) - T)^2 = 4 / 8, of (S(x') - T)^2 = 3 / 8; stem: 9 + 9.
    att = 4 / 8 + 3 / 8 + 18.0
    np.testing.assert_allclose(m["atat_attention"], att, rtol=1e-6)
    np.testing.assert_allclose(value, CE + 3.0 * att, rtol=1e-6)
    assert float(m["atat_logit"]) == 0.0

  def test_teacher_inputs_get_no_gradient_and_equal_maps_a_finite_one(self):
    def value(s, t, z, tz):
      return atat.atat_loss("paper", z, LABELS, student_maps=s, teacher_maps=t, teacher_logits=tz)[
        0
      ]

    g_s, g_t, _, g_tz = jax.grad(value, argnums=(0, 1, 2, 3))(S_MAPS, T_MAPS, LOGITS, LOGITS[:2])
    assert all(float(jnp.abs(l).sum()) == 0.0 for l in jax.tree.leaves((g_t, g_tz)))
    # S(x_0) = T_0: the L2 norm's gradient there is 0, not NaN.
    assert (
      np.all(np.isfinite(np.asarray(g_s["features"])))
      and float(jnp.abs(g_s["features"][0]).sum()) == 0.0
    )
    np.testing.assert_allclose(
      atat.l2_rows(jnp.ones((2, 3)), jnp.zeros((2, 3))), [math.sqrt(3)] * 2, rtol=1e-6
    )

  def test_bad_inputs_name_the_fix(self):
    with pytest.raises(ValueError, match="not one of"):
      atat.atat_loss("paperish", LOGITS, LABELS)
    with pytest.raises(ValueError, match=r"\[x; x'\] = 2 x 2 rows"):
      atat.atat_loss("paper", LOGITS[:3], LABELS, student_maps=S_MAPS, teacher_maps=T_MAPS)
    with pytest.raises(ValueError, match="same sites"):
      atat.atat_loss(
        "paper", LOGITS, LABELS, student_maps=S_MAPS, teacher_maps={"features": T_FEAT}
      )
    with pytest.raises(ValueError, match="needs teacher_logits"):
      atat.atat_loss("code_cifar10", LOGITS, LABELS)


def test_config_errors_name_the_value():
  for key, value, match in (
    ("variant", "code", r"objective.atat.variant = 'code' is not one of"),
    ("steps", 0, r"objective.atat.steps = 0 must be >= 1"),
    ("cam_norm", "l2", r"objective.atat.cam_norm = 'l2'"),
    ("lam_at", -1.0, r"objective.atat.lam_at = -1.0 must be >= 0"),
    ("sites", (), r"objective.atat.sites = \(\) is empty"),
  ):
    with pytest.raises(ValueError, match=match):
      atat._config(tiny_config("atat", **{f"objective.atat.{key}": value}))


# ---------------------------------------------------------------- Grad-CAM in the training pass


def tiny_bn(batch=6):
  model = build_model("tiny_bn", num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3)
  x = jax.random.uniform(jax.random.key(0), (batch, 8, 8, 3))
  v = model.init(jax.random.key(1), x, train=False)
  stats = jax.tree.map(
    lambda s: s + 0.3 * jax.random.uniform(jax.random.key(2), s.shape), v["batch_stats"]
  )
  return model, {"params": v["params"], "batch_stats": stats}, x


def smallcnn(batch=4):
  """SmallCNN with a random (not zero) classifier: its flatten + MLP head makes the
  Grad-CAM weights depend on the features (a real second-order path)."""
  model = build_model("smallcnn", num_classes=10, mean=(0.3,), std=(0.35,))
  x = jax.random.uniform(jax.random.key(3), (batch, 28, 28, 1))
  params = dict(model.init(jax.random.key(4), x, train=False)["params"])
  params["classifier"] = {
    "kernel": 0.3 * jax.random.normal(jax.random.key(5), params["classifier"]["kernel"].shape),
    "bias": params["classifier"]["bias"],
  }
  return model, {"params": params}, x


def test_grad_cam_pass_is_one_train_pass_and_the_toolkits_grad_cam_at_each_site():
  model, v, x = tiny_bn()
  y = jnp.arange(6) % 10
  state = {"batch_stats": v["batch_stats"]}
  out, fg = jax.jit(
    lambda p: atat.grad_cam_pass(model, p, state, x, y, sites=("features", "stem"), mode="train")
  )(v["params"])
  plain = base.forward(model, v["params"], state, x, mode="train", taps=base.ALL_TAPS)
  chex.assert_trees_all_close(out.logits, plain.logits, atol=1e-6)
  chex.assert_trees_all_close(
    out.model_state, plain.model_state, atol=1e-6
  )  # BN statistics updated once
  assert "perturbations" not in out.model_state and set(out.taps) == set(plain.taps)
  for site in ("features", "stem"):
    # Independent: the toolkit's tap_grad (batch statistics, one site at a time).
    tg = at.tap_grad(model, v, x, y, site=site, mode="batch")
    chex.assert_trees_all_close(fg[site][0], tg.features, atol=1e-6)
    chex.assert_trees_all_close(fg[site][1], tg.grads, atol=1e-6)
  maps = atat.site_maps(fg, normalize="minmax", scale=1.0)
  expected = at.maps(model, v, x, y, kinds=("grad_cam",), mode="batch", normalize="minmax")[
    "grad_cam"
  ]
  chex.assert_trees_all_close(maps["features"], expected, atol=1e-6)
  # TinyBNNet's `features` feed GAP + linear: Grad-CAM = relu(CAM) / HW (the code's map, unscaled).
  cam = at.cam(fg["features"][0], v["params"]["classifier"]["kernel"], y, relu=True) / 64
  chex.assert_trees_all_close(atat.site_maps(fg, normalize=None)["features"], cam, atol=1e-6)


@pytest.mark.parametrize("name,variant", [("tiny_bn", "code_cifar100"), ("smallcnn", "paper")])
@pytest.mark.slow
def test_the_gradient_through_the_students_grad_cam_matches_finite_differences(name, variant):
  model, v, x = tiny_bn() if name == "tiny_bn" else smallcnn()
  n = x.shape[0] // 2
  y = jnp.arange(n) % 10
  state = {k: s for k, s in v.items() if k != "params"}
  target = {
    "features": jax.random.uniform(
      jax.random.key(8), (n,) + ((4, 4) if name == "smallcnn" else (8, 8))
    )
  }

  def make_loss(second_order):
    norm = "minmax" if variant == "paper" else None

    @jax.jit
    def loss(params):
      out, fg = atat.grad_cam_pass(
        model, params, state, x, jnp.concatenate([y, y]), sites=("features",), mode="train"
      )
      if not second_order:  # Grad-CAM weights treated as constants: no double backprop
        fg = {s: (a, jax.lax.stop_gradient(g)) for s, (a, g) in fg.items()}
      maps = atat.site_maps(fg, normalize=norm)
      # The attention term alone (CE and the logit term would swamp it in the comparison).
      return atat.atat_loss(variant, out.logits, y, student_maps=maps, teacher_maps=target)[1][
        "atat_attention"
      ]

    return loss

  loss, first_order_only = make_loss(True), make_loss(False)
  g = jax.grad(loss)(v["params"])
  d = jax.tree.map(lambda p: jax.random.normal(jax.random.key(7), p.shape) * 1e-2, v["params"])
  h = 3e-3
  plus = loss(jax.tree.map(lambda p, e: p + h * e, v["params"], d))
  minus = loss(jax.tree.map(lambda p, e: p - h * e, v["params"], d))
  fd = (plus - minus) / (2 * h)
  dot = lambda tree: sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(d)))
  np.testing.assert_allclose(fd, dot(g), rtol=0.02, atol=1e-6)
  # The second-order path matters: dropping it misses the finite difference by far more.
  truncated = dot(jax.grad(first_order_only)(v["params"]))
  assert abs(float(truncated - fd)) > 0.1 * abs(float(fd)), (fd, truncated)
  head = g["classifier"]["kernel"]  # the head after the site learns through the map
  assert bool(jnp.all(jnp.isfinite(head))) and float(jnp.abs(head).sum()) > 0


def _code_cam(a, kernel, y, relu, n_graph=None):
  """The official ``costs`` scope by hand for a GAP + linear head: tf.gradients of
  reduce_mean(pre_softmax * one_hot(y)) over the graph's ``n_graph x K`` entries w.r.t. the
  map ``A [N, H, W, C]`` is ``W[c, y_n] / (H W n_graph K)`` at every position, the weights are its
  spatial mean, the map ``sum_c weights_c A_c`` (cifar100/model1.py:103-112), ReLU'd or not.
  ``n_graph=None``: each example's own ``d z[n, y_n] / dA`` (no ``1 / (N K)``)."""
  a, kernel = np.asarray(a, np.float64), np.asarray(kernel, np.float64)
  hw, k = a.shape[1] * a.shape[2], kernel.shape[1]
  weights = kernel[:, np.asarray(y)].T / (hw * (1 if n_graph is None else n_graph * k))  # [N, C]
  cam = np.einsum("nhwc,nc->nhw", a, weights)
  return np.maximum(cam, 0.0) if relu else cam


@pytest.fixture(scope="module")
def code_maps():
  """Student (train mode over [x; x']) and an independent teacher (eval mode over x), both
  TinyBNNet (features -> GAP -> Dense), and one jitted :func:`atat.attention_maps` per setting."""
  model, v, x = tiny_bn(batch=8)
  _, tv, _ = tiny_bn(batch=8)
  tv = {
    "params": jax.tree.map(
      lambda p: p + 0.2 * jax.random.normal(jax.random.key(9), p.shape), tv["params"]
    ),
    "batch_stats": tv["batch_stats"],
  }
  x, adv, y = x[:4], x[4:], jnp.array([0, 3, 3, 7])
  state = {"batch_stats": v["batch_stats"]}
  fns = {
    name: jax.jit(
      lambda p, kw=kw: atat.attention_maps(
        model, p, state, model, tv, x, adv, y, sites=("features",), cam_norm="none", **kw
      )
    )
    for name, kw in (
      ("code", dict(cam_scale="code", student_relu=False)),
      ("cam_mse", dict(cam_scale="per_example", student_relu=True)),
    )
  }
  both = jnp.concatenate([x, adv])
  a_s = base.forward(model, v["params"], state, both, mode="train", taps=base.ALL_TAPS).taps[
    "features"
  ]
  a_t = base.forward(
    model, tv["params"], {"batch_stats": tv["batch_stats"]}, x, mode="eval", taps=base.ALL_TAPS
  ).taps["features"]
  return dict(
    fns=fns,
    params=v["params"],
    y=y,
    a_s=a_s,
    a_t=a_t,
    w_s=v["params"]["classifier"]["kernel"],
    w_t=tv["params"]["classifier"]["kernel"],
  )


@pytest.mark.parametrize("setting", ["code", "cam_mse"])
def test_code_cifar100_loss_recomputed_by_hand_with_the_codes_scale_and_pre_relu_map(
  code_maps, setting
):
  m = code_maps
  y, n = m["y"], 4
  out, t_out, s_maps, t_maps = m["fns"][setting](m["params"])
  yy = np.concatenate([y, y])
  if (
    setting == "code"
  ):  # student: 2B rows, raw map; teacher: B rows, ReLU'd (cifar100/model.py:118-120)
    s_want, t_want = (
      _code_cam(m["a_s"], m["w_s"], yy, False, 2 * n),
      _code_cam(m["a_t"], m["w_t"], y, True, n),
    )
    assert np.any(s_want < -1e-6) and np.any(
      s_want > 1e-6
    )  # a ReLU on the student's map would change it
  else:  # agad's first reading: d z[b, y_b] / dA per example, both ReLU'd
    s_want, t_want = _code_cam(m["a_s"], m["w_s"], yy, True), _code_cam(m["a_t"], m["w_t"], y, True)
  np.testing.assert_allclose(
    s_maps["features"], s_want, rtol=1e-4, atol=1e-6 * np.abs(s_want).max()
  )
  np.testing.assert_allclose(
    t_maps["features"], t_want, rtol=1e-4, atol=1e-6 * np.abs(t_want).max()
  )
  variant = "code_cifar100" if setting == "code" else "cam_mse"
  value, metrics = atat.atat_loss(variant, out.logits, y, student_maps=s_maps, teacher_maps=t_maps)
  att = np.mean((s_want[:n] - t_want) ** 2) + np.mean((s_want[n:] - t_want) ** 2)
  ce = np.mean(np.asarray(attack_losses.cross_entropy(out.logits, jnp.asarray(yy))))
  np.testing.assert_allclose(metrics["atat_attention"], att, rtol=1e-4)
  np.testing.assert_allclose(value, ce + att, rtol=1e-5)
  if (
    setting == "code"
  ):  # the code's map term is CE plus a vanishing term: 1/(N K)^2 of the per-example one
    assert float(metrics["atat_attention"]) < 1e-6 * float(metrics["atat_ce"])


# ---------------------------------------------------------------- teacher and pipeline


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
  root = tmp_path_factory.mktemp("teachers")
  first, other = str(root / "teacher"), str(root / "other")
  loop.Trainer(tiny_config("standard", num_epochs=1), first).run()
  loop.Trainer(tiny_config("standard", num_epochs=1, seed=7), other).run()
  return first, other


def _student(teacher_dir, init=True, **kw):
  config = tiny_config(
    "atat", num_epochs=1, **({"init.workdir": teacher_dir} if init else {}), **kw
  )
  config.objective.atat.teacher.workdir = teacher_dir
  return config


def _batch(trainer, n=8):
  train = trainer.exp.splits.train
  return {
    "image": jnp.asarray(np.stack([train[i]["image"] for i in range(n)]), jnp.float32) / 255.0,
    "label": jnp.asarray([train[i]["label"] for i in range(n)], jnp.int32),
  }


@pytest.mark.slow
def test_each_variants_loss_equals_an_independent_recomputation(teachers, tmp_path):
  trainer = loop.Trainer(
    _student(teachers[0], **{"attack.eps_warmup_steps": 0}), str(tmp_path / "s")
  )
  state, model = trainer.initial_state(), trainer.exp.model
  batch, aux_in = _batch(trainer), {base.FROZEN: trainer.frozen}
  x, y = batch["image"], batch["label"]
  # ATAT's own attack: PGD-7 with batch statistics (the code's train-mode graph), uniform start.
  objective = trainer.exp.objective
  assert (objective.bn_policy.attack, trainer.config.objective.atat.steps) == ("batch", 7)
  adv = jax.jit(objective.generate)(
    state.params, state.model_state, aux_in, batch, jax.random.key(3), state.step
  )
  assert 0 < float(jnp.max(jnp.abs(adv - x))) <= trainer.config.attack.eps + 1e-6

  both, yy = jnp.concatenate([x, adv]), jnp.concatenate([y, y])
  n, k = 8, 10
  teacher = agad.load(teachers[0], "latest")
  z = base.forward(model, state.params, state.model_state, both, mode="batch").logits
  z_t = teacher.logits_fn(x)
  ce = np.mean(np.asarray(attack_losses.cross_entropy(z, yy)))
  # Independent Grad-CAMs: the toolkit's tap_grad, student with batch statistics over [x; x'].
  tg_s = at.tap_grad(
    model, {"params": state.params, **state.model_state}, both, yy, site="features", mode="batch"
  )
  tg_t = at.tap_grad(teacher.model, teacher.variables, x, y, site="features", mode="eval")
  s_raw, t_raw = (
    at.grad_cam_from_grads(tg_s.features, tg_s.grads),
    at.grad_cam_from_grads(tg_t.features, tg_t.grads),
  )
  s_pre = at.grad_cam_from_grads(tg_s.features, tg_s.grads, relu=False)
  s_mm, t_mm = (
    np.asarray(at.normalize_maps(s_raw, "minmax")),
    np.asarray(at.normalize_maps(t_raw, "minmax")),
  )
  dist = lambda a, b: np.sqrt(
    np.sum((np.asarray(a) - np.asarray(b)) ** 2, axis=tuple(range(1, a.ndim)))
  )
  logit_mse = np.mean((z[:n] - z_t) ** 2) + np.mean((z[n:] - z_t) ** 2)
  expected = {  # variant (its defaults, resolved by atat.settings) -> (attention term, logit term)
    "paper": (np.mean(dist(t_mm, s_mm[n:]) + dist(t_mm, s_mm[:n])), np.mean(dist(z[:n], z[n:]))),
    "code_cifar10": (0.0, logit_mse),
    "logit_mse": (0.0, logit_mse),
    "cam_mse": (np.mean((s_raw[:n] - t_raw) ** 2) + np.mean((s_raw[n:] - t_raw) ** 2), 0.0),
    # tf.gradients(reduce_mean(z * onehot)) over 2B rows (student, raw map) and B rows (teacher, ReLU'd).
    "code_cifar100": (
      np.mean((s_pre[:n] / (2 * n * k) - t_raw / (n * k)) ** 2)
      + np.mean((s_pre[n:] / (2 * n * k) - t_raw / (n * k)) ** 2),
      0.0,
    ),
  }
  updated = base.forward(model, state.params, state.model_state, both, mode="train").model_state
  for variant, (att, lp) in expected.items():
    # The code variants start from random init (no init.workdir), the others from the teacher.
    config = _student(
      teachers[0], init=variant not in atat.CODE_VARIANTS, **{"objective.atat.variant": variant}
    )
    obj = atat.objective(model, config)
    frozen, _ = obj.frozen(trainer.exp.splits)
    value, aux = jax.jit(obj.loss)(
      state.params,
      state.model_state,
      {base.FROZEN: frozen},
      batch,
      adv,
      jax.random.key(4),
      state.step,
    )
    np.testing.assert_allclose(value, ce + att + lp, rtol=1e-5, err_msg=variant)
    # Each term on its own (the code's map term is ~1e-8 of the CE, invisible in the sum).
    np.testing.assert_allclose(
      [aux.metrics["atat_attention"], aux.metrics["atat_logit"]],
      [att, lp],
      rtol=1e-4,
      atol=1e-12,
      err_msg=variant,
    )
    term = aux.metrics["atat_logit" if atat.LOSSES[variant] == "logit_mse" else "atat_attention"]
    assert float(term) > 0 and float(aux.metrics["atat_ce"]) > 0, variant
    # One train-mode pass over [x; x']: its statistics are the loss's new model state.
    chex.assert_trees_all_close(aux.model_state, updated, atol=1e-6)
    assert set(aux.passes) == {"clean", "adv"} and aux.passes["adv"].logits.shape == (n, k)


@pytest.mark.slow
def test_teacher_frozen_unchanged_not_checkpointed_and_resume_with_another_refused(
  teachers, tmp_path
):
  teacher_dir = str(tmp_path / "teacher")
  shutil.copytree(teachers[0], teacher_dir)
  before = agad.load(teacher_dir, "latest")
  student_dir = str(tmp_path / "student")
  trainer = loop.Trainer(
    _student(teacher_dir, stop_after_steps=2, **{"objective.atat.steps": 2}), student_dir
  )
  frozen_before = jax.device_get(trainer.frozen["teacher"])
  start = jax.device_get(trainer.initial_state().params)  # the student starts from its teacher
  chex.assert_trees_all_equal(start, jax.device_get(before.variables["params"]))
  final = trainer.run()
  assert trainer.train_traces == 1 and jax.device_get(final.aux_state) == {}
  chex.assert_trees_all_equal(jax.device_get(trainer.frozen["teacher"]), frozen_before)
  assert checkpoint.params_hash(
    agad.load(teacher_dir, "latest").variables
  ) == checkpoint.params_hash(before.variables)
  assert not np.array_equal(
    jax.device_get(final.params)["classifier"]["kernel"], start["classifier"]["kernel"]
  )
  raw, step = checkpoint.read_state(student_dir, "latest")
  assert step == 2 and not raw.get("aux_state")
  ckpt = checkpoint.Checkpointer(os.path.join(student_dir, "checkpoints"))
  meta = ckpt.read_meta(2)
  ckpt.close()
  assert meta["frozen"]["teacher"]["params_hash"] == checkpoint.params_hash(before.variables)
  metrics = [json.loads(l) for l in open(os.path.join(student_dir, "metrics.jsonl"))]
  terms = [m for m in metrics if "train/atat_attention" in m]
  assert terms and all(
    np.isfinite(m["train/loss"]) and m["train/atat_attention"] > 0 for m in terms
  )

  # Another teacher in the same workdir field: refused on resume.
  shutil.rmtree(teacher_dir)
  shutil.copytree(teachers[1], teacher_dir)
  with pytest.raises(ValueError, match="(?s)refusing to resume.*frozen.teacher.params_hash"):
    loop.Trainer(_student(teacher_dir, **{"objective.atat.steps": 2}), student_dir).run()
  # The student loads and evaluates without its teacher; no adaptive loss (plain backbone).
  shutil.rmtree(teacher_dir)
  loaded = agad.load(student_dir, "latest")
  assert loaded.logits_fn(jnp.zeros((2, 8, 8, 1))).shape == (2, 10)
  assert loaded.objective().adaptive_loss is None


@pytest.mark.parametrize(
  "key,value,field",
  [
    ("data.name", "fashion_mnist", "data.name = 'fashion_mnist'"),
    ("model.name", "resnet18", "model.name = 'resnet18'"),
    ("model.input_norm", "per_image", "config.model.input_norm = 'per_image'"),
  ],
)
def test_an_incompatible_teacher_is_refused_before_training(teachers, tmp_path, key, value, field):
  teacher_dir = str(tmp_path / "teacher")
  shutil.copytree(teachers[0], teacher_dir)
  path = os.path.join(teacher_dir, "config.json")
  saved = json.load(open(path))
  section, leaf = key.split(".")
  saved[section][leaf] = value
  json.dump(saved, open(path, "w"))
  with pytest.raises(
    ValueError, match=f"(?s)ATAT teacher.*{field}.*config.objective.atat.teacher.workdir"
  ):
    loop.Trainer(_student(teacher_dir), str(tmp_path / "s"))
  assert not os.path.exists(tmp_path / "s" / "checkpoints")


def test_a_missing_teacher_names_the_field_and_a_foreign_init_warns(teachers, tmp_path, caplog):
  with pytest.raises(ValueError, match="config.objective.atat.teacher.workdir is empty"):
    loop.Trainer(_student(""), str(tmp_path / "a"))
  with pytest.raises(
    FileNotFoundError, match="config.objective.atat.teacher.workdir = .*no config.json"
  ):
    loop.Trainer(_student(str(tmp_path / "nowhere")), str(tmp_path / "b"))
  with caplog.at_level(logging.WARNING):
    loop.Trainer(_student(teachers[0], init=False), str(tmp_path / "c"))
  assert "is not the teacher" in caplog.text and "--config.init.workdir=" in caplog.text


def test_code_variants_start_from_random_init_with_the_schedule_at_the_teachers_step(
  teachers, tmp_path, caplog
):
  """train_tsf.py: the student (scope ``new``) is initialised at random, saver1 restores the
  teacher and ``global_step``, and the piecewise lr is a function of that step."""
  teacher = agad.load(teachers[0], "latest")
  # 80 train images / 16 = 5 steps per epoch: lr 0.1, x0.1 at steps 1 and 3; the teacher ran 5 steps.
  sched = {"optim.schedule": "piecewise", "optim.lr": 0.1, "optim.boundaries": (0.2, 0.6)}
  code_cfg = lambda **kw: _student(
    teachers[0], init=False, **{**sched, "objective.atat.variant": "code_cifar100", **kw}
  )
  with pytest.raises(
    ValueError, match=r"student_start resolves to 'code'.*drop --config.init.workdir"
  ):
    loop.Trainer(
      _student(teachers[0], **sched, **{"objective.atat.variant": "code_cifar10"}),
      str(tmp_path / "a"),
    )
  with caplog.at_level(logging.WARNING):
    code = loop.Trainer(code_cfg(), str(tmp_path / "b"))
  assert "is not the teacher" not in caplog.text
  assert code.frozen_record["schedule_start_step"] == teacher.step == 5
  paper = loop.Trainer(_student(teachers[0], **sched), str(tmp_path / "c"))
  assert "schedule_start_step" not in paper.frozen_record
  np.testing.assert_allclose(
    [paper.schedule(0), paper.schedule(1), paper.schedule(3), code.schedule(0)],
    [0.1, 0.01, 0.001, 0.001],
    rtol=1e-6,
  )
  start = lambda trainer: jax.device_get(trainer.initial_state().params)["classifier"]["kernel"]
  t_kernel = np.asarray(teacher.variables["params"]["classifier"]["kernel"])
  assert not np.allclose(start(code), t_kernel) and np.array_equal(start(paper), t_kernel)
  # Today's start stays reachable by name; a cosine schedule read past its end (lr 0) is refused.
  old = loop.Trainer(
    code_cfg(**{"objective.atat.student_start": "teacher", "init.workdir": teachers[0]}),
    str(tmp_path / "d"),
  )
  assert "schedule_start_step" not in old.frozen_record and float(old.schedule(0)) == pytest.approx(
    0.1
  )
  with pytest.raises(ValueError, match=r"schedule at step 5 .*'cosine' gives lr 0"):
    loop.Trainer(code_cfg(**{"optim.schedule": "cosine"}), str(tmp_path / "e"))


def test_cifar_recipes_are_the_papers_protocol_as_coded():
  from configs import cifar10, cifar100

  c = cifar10.get_config("wrn34_10,atat")
  spe = (50_000 - 1000) // 32
  assert (c.model.name, c.model.input_norm, c.batch_size) == ("wrn34_10", "per_image", 32)
  assert (c.optim.lr, c.optim.momentum, c.optim.weight_decay, c.optim.schedule) == (
    0.1,
    0.9,
    2e-4,
    "piecewise",
  )
  np.testing.assert_allclose(
    [c.optim.boundaries[0] * spe, c.optim.boundaries[1] * spe], [40_000, 60_000]
  )
  assert c.num_epochs == 261 and abs(c.num_epochs * spe - 400_000) < spe / 2
  assert (c.attack.eps, c.attack.step_size, c.attack.random_start, c.objective.atat.steps) == (
    8 / 255,
    2 / 255,
    "uniform",
    7,
  )
  assert c.objective.atat.to_dict() == atat.DEFAULTS.to_dict()
  c100 = cifar100.get_config("wrn34_10,atat")
  assert (c100.data.name, c100.batch_size, c100.num_epochs) == ("cifar100", 32, c.num_epochs)
  assert cifar10.get_config("wrn34_10,atat,smoke").num_epochs == 2
  assert cifar10.get_config("resnet18,atat").batch_size == 128  # the recipe is the WRN's only


def _run(args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run(
    [sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True
  )


@pytest.mark.skipif(
  not os.path.exists(FMNIST),
  reason="Debian package dataset-fashion-mnist not installed (launch/env.sh installs it)",
)
@pytest.mark.slow
def test_fashion_mnist_two_command_pipeline_starts(tmp_path):
  teacher, student = str(tmp_path / "atat_teacher"), str(tmp_path / "atat")
  out = _run(
    [
      "launch.train",
      "--config=configs/fashion_mnist.py:smallcnn,standard,smoke",
      "--config.stop_after_steps=2",
      f"--workdir={teacher}",
    ]
  )
  assert out.returncode == 0, out.stderr[-3000:]
  out = _run(
    [
      "launch.train",
      "--config=configs/fashion_mnist.py:smallcnn,atat,smoke",
      f"--config.objective.atat.teacher.workdir={teacher}",
      f"--config.init.workdir={teacher}",
      "--config.stop_after_steps=2",
      f"--workdir={student}",
    ]
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "is not the teacher" not in out.stderr
  saved = json.load(open(os.path.join(student, "config.json")))
  assert (
    saved["objective"]["atat"]["variant"] == "paper"
    and saved["objective"]["atat"]["teacher"]["workdir"] == teacher
  )
  metrics = [json.loads(l) for l in open(os.path.join(student, "metrics.jsonl"))]
  assert any(np.isfinite(m.get("train/atat_attention", np.nan)) for m in metrics)
