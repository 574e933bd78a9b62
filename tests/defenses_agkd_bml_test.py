"""AGKD-BML: the stable loss functions on hand values, the per-batch pipeline (most
confusing labels, class-bank negatives, targeted attacks), the loss against an
independent recomputation, the frozen teacher (unchanged, not checkpointed, checked
against the student's config before training, resume with another teacher refused) and
an end-to-end teacher -> student run through ``loop.Trainer``."""

import json
import math
import os
import shutil

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import agad
from agad import checkpoint
from agad.attacks import losses as attack_losses
from agad.defenses import agkd_bml as agkd
from agad.defenses.agkd_bml import attention_l1, bml_triplet_loss, mart_term, most_confusing_labels
from agad.objectives import base
from agad.objectives.mart import mart_loss
from agad.training import loop
from agad.models import BatchNorm
from tests.helpers import F32, assert_close, tiny_config


class LossFunctionsTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_most_confusing_labels_exclude_the_true_class(self):
    fn = self.variant(most_confusing_labels)
    logits = jnp.array([[5.0, 1.0, 3.0], [0.0, 2.0, 2.5], [-1.0, -1.0, -1e5]])
    np.testing.assert_array_equal(fn(logits, jnp.array([0, 2, 0])), [2, 1, 1])
    # Random logits with the true class forced to the top: never y, always the runner-up.
    z = jax.random.normal(jax.random.key(0), (256, 10))
    y = jax.random.randint(jax.random.key(1), (256,), 0, 10)
    z = z.at[jnp.arange(256), y].set(9.0)
    mc = np.asarray(fn(z, y))
    assert not np.any(mc == np.asarray(y))
    np.testing.assert_array_equal(mc, np.argsort(np.asarray(z), -1)[:, -2])

  @chex.variants(with_jit=True, without_jit=True)
  def test_bml_triplet_loss_on_hand_values_with_abs_cos(self):
    fn = self.variant(lambda a, p, n: bml_triplet_loss(a, p, n, margin=0.03, lam_norm=0.001))
    a = jnp.array([[1.0, 0.0], [1.0, 0.0]])
    p = jnp.array([[-1.0, 0.0], [1.0, 1.0]])  # |cos| = 1 -> d = 0 (not 2); cos = 1/sqrt2
    n = jnp.array([[0.0, 1.0], [1.0, 0.0]])  # d = 1; d = 0
    # Example 0: max(0, 0.03 + 0 - 1) = 0. Example 1: 0.03 + (1 - 1/sqrt2) - 0.
    trip = (0.0 + 0.03 + 1 - 1 / math.sqrt(2)) / 2
    norm = (2 / 4) + (3 / 4) + (2 / 4)  # mean of squares over all B*D entries
    np.testing.assert_allclose(fn(a, p, n), trip + 0.001 * norm, rtol=1e-6)
    # The norm term alone (identical triplet distances, margin 0): lam_norm * 1.75.
    np.testing.assert_allclose(
      bml_triplet_loss(a, a, a, margin=0.0, lam_norm=2.0), 2.0 * (0.5 * 3), rtol=1e-6
    )
    np.testing.assert_allclose(agkd.angular_distance(a, -a), [0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(agkd.angular_distance(a, jnp.zeros_like(a)), [1.0, 1.0])  # code: NaN

  @chex.variants(with_jit=True, without_jit=True)
  def test_attention_l1_min_max_normalises_channel_sums_and_stops_the_teacher(self):
    fn = self.variant(attention_l1)
    # Student channel sums [[1, 2], [3, 5]] -> (m - 1) / 4 = [0, .25, .5, 1];
    # teacher [[2, 2], [2, 6]] -> [0, 0, 0, 1]. Mean |diff| over B*H*W = 4: 0.75 / 4.
    s = jnp.array([[[[1.0, 0.0], [1.0, 1.0]], [[2.0, 1.0], [4.0, 1.0]]]])  # [1, 2, 2, 2]
    t = jnp.array([[[[2.0], [2.0]], [[2.0], [6.0]]]])  # [1, 2, 2, 1]
    np.testing.assert_allclose(fn(s, t), 0.1875, rtol=1e-6)
    # Two examples: the mean runs over B*H*W; a constant map normalises to 0 (code: NaN).
    s2, t2 = jnp.concatenate([s, jnp.ones_like(s)]), jnp.concatenate([t, t])
    np.testing.assert_allclose(fn(s2, t2), (0.75 + 1.0) / 8, rtol=1e-6)
    g_s, g_t = jax.grad(fn, argnums=(0, 1))(s, t)
    assert np.abs(np.asarray(g_s)).sum() > 0 and np.all(np.asarray(g_t) == 0)
    with pytest.raises(ValueError, match=r"differ in \[B, H, W\].*same model"):
      attention_l1(s, jnp.zeros((1, 4, 4, 1)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_mart_term_on_hand_values_is_mart_without_its_ce(self):
    fn = self.variant(lambda c, a, y: mart_term(c, a, y, beta=6.0))
    p_adv, p_nat = np.array([0.5, 0.3, 0.2]), np.array([0.6, 0.2, 0.2])
    # y = 0 is the top adversarial class -> y_hat = 1 (the runner-up).
    bce = -math.log(1.0001 - 0.3 + 1e-12)
    kl = sum(q * (math.log(q) - math.log(r + 1e-12)) for q, r in zip(p_nat, p_adv))
    expected = bce + 6.0 * kl * (1.0000001 - 0.6)
    value = fn(jnp.log(jnp.array([p_nat])), jnp.log(jnp.array([p_adv])), jnp.array([0]))
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    # y = 2 (not the top): y_hat = 0.
    expected2 = -math.log(1.0001 - 0.5 + 1e-12) + 6.0 * kl * (1.0000001 - 0.2)
    value2 = fn(jnp.log(jnp.array([p_nat])), jnp.log(jnp.array([p_adv])), jnp.array([2]))
    np.testing.assert_allclose(value2, expected2, rtol=1e-5)
    zc, za = jax.random.normal(jax.random.key(0), (2, 5, 10))
    y = jnp.arange(5)
    np.testing.assert_allclose(
      fn(zc, za, y) + jnp.mean(attack_losses.cross_entropy(za, y)),
      mart_loss(zc, za, y, beta=6.0),
      rtol=1e-5,
    )


# ---------------------------------------------------------------- BatchNorm as DataParallel


def test_chunk_sizes_follow_torch_chunk_not_an_even_split():
  # DataParallel scatters with tensor.chunk(n_devices): ceil(n/k)-row pieces, the last one
  # smaller, fewer pieces than devices when they run out (np.array_split would give
  # (3, 3, 2, 2) for 10 over 4 and always k pieces).
  assert agkd.chunk_sizes(384, 8) == (48,) * 8  # the code: batch 128, [x_a; x; x_n']
  assert agkd.chunk_sizes(240, 8) == (30,) * 8  # its last batch of an epoch (50000 % 128 = 80)
  assert agkd.chunk_sizes(10, 4) == (3, 3, 3, 1)
  assert agkd.chunk_sizes(9, 4) == (3, 3, 3)  # 3 replicas run, not 4
  assert agkd.chunk_sizes(10, 8) == (2,) * 5
  assert agkd.chunk_sizes(5, 8) == (1,) * 5
  assert agkd.chunk_sizes(7, 1) == (7,)
  with pytest.raises(ValueError, match="chunks >= 1"):
    agkd.chunk_sizes(4, 0)


class _OneBN(nn.Module):
  """The agad model interface around a single BatchNorm: logits = the normalised pixels."""

  @nn.compact
  def __call__(self, x, *, train, labels=None, norm_ctx=None):
    h = BatchNorm(name="bn")(x, train=train)
    self.sow("intermediates", "features", h)
    return h.reshape(h.shape[0], -1)


def test_data_parallel_forward_normalises_per_chunk_and_keeps_chunk0_running_stats():
  # 10 one-pixel examples over 4 "devices": chunks (3, 3, 3, 1).
  x = jnp.array([0.0, 1, 2, 10, 11, 12, 20, 21, 23, 30]).reshape(10, 1, 1, 1)
  model = _OneBN()
  variables = model.init(jax.random.key(0), x, train=False)
  state = {"batch_stats": variables["batch_stats"]}
  out = jax.jit(
    lambda v: agkd.data_parallel_forward(
      model, variables["params"], state, v, chunks=4, taps=("features",)
    )
  )(x)
  eps = 1e-5
  expected = np.concatenate(
    [
      (np.array([0.0, 1, 2]) - 1) / np.sqrt(2 / 3 + eps),  # chunk 0: mean 1, var 2/3
      (np.array([10.0, 11, 12]) - 11) / np.sqrt(2 / 3 + eps),  # chunk 1: its own mean 11
      (np.array([20.0, 21, 23]) - 64 / 3) / np.sqrt(14 / 9 + eps),
      [0.0],
    ]
  )  # chunk 3: one example
  np.testing.assert_allclose(out.logits[:, 0], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.taps["features"].reshape(-1), expected, rtol=1e-5, atol=1e-6)
  # Running statistics (momentum 0.9 from mean 0, var 1; flax's biased variance): chunk 0's
  # update only. The whole batch would give mean 0.1 * 13 and var 0.9 + 0.1 * 95.
  stats = out.model_state["batch_stats"]["bn"]
  np.testing.assert_allclose(stats["mean"], [0.1 * 1.0], rtol=1e-6)
  np.testing.assert_allclose(stats["var"], [0.9 + 0.1 * 2 / 3], rtol=1e-6)
  mixed = base.forward(model, variables["params"], state, x, mode="train")
  np.testing.assert_allclose(mixed.model_state["batch_stats"]["bn"]["mean"], [1.3], rtol=1e-6)
  np.testing.assert_allclose(mixed.model_state["batch_stats"]["bn"]["var"], [0.9 + 9.5], rtol=1e-5)
  # One chunk is the ordinary train-mode pass.
  one = agkd.data_parallel_forward(model, variables["params"], state, x, chunks=1)
  chex.assert_trees_all_close(
    (one.logits, one.model_state), (mixed.logits, mixed.model_state), **F32
  )


def test_config_errors_name_the_value():
  with pytest.raises(
    ValueError, match=r"objective.agkd_bml.label_smoothing = 1.5 must lie in \[0, 1\)"
  ):
    agkd._config(tiny_config("agkd_bml", **{"objective.agkd_bml.label_smoothing": 1.5}))
  with pytest.raises(ValueError, match=r"objective.agkd_bml.steps = 0 must be >= 1"):
    agkd._config(tiny_config("agkd_bml", **{"objective.agkd_bml.steps": 0}))
  with pytest.raises(
    ValueError, match=r"objective.agkd_bml.bn = 'batch' must be one of \('code', 'mixed'\)"
  ):
    agkd._config(tiny_config("agkd_bml", **{"objective.agkd_bml.bn": "batch"}))
  with pytest.raises(ValueError, match=r"objective.agkd_bml.chunks = 0 must be an int >= 1"):
    agkd._config(tiny_config("agkd_bml", **{"objective.agkd_bml.chunks": 0}))


# ---------------------------------------------------------------- teacher and pipeline

LS = {"objective.standard.label_smoothing": 0.5, "objective.standard.smoothing": "others"}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
  root = tmp_path_factory.mktemp("teachers")
  first, other = str(root / "teacher"), str(root / "other")
  loop.Trainer(tiny_config("standard", num_epochs=1, **LS), first).run()
  loop.Trainer(tiny_config("standard", num_epochs=1, seed=7, **LS), other).run()
  return first, other


def _student(teacher_dir, **kw):
  config = tiny_config("agkd_bml", num_epochs=1, **{"init.workdir": teacher_dir, **kw})
  config.objective.agkd_bml.teacher.workdir = teacher_dir
  return config


@pytest.mark.slow
def test_pipeline_labels_negatives_and_targeted_attacks(teachers, tmp_path):
  # No eps warm-up (the Fashion-MNIST smoke config ramps eps from 1/226 of its value).
  trainer = loop.Trainer(
    _student(teachers[0], **{"attack.eps_warmup_steps": 0}), str(tmp_path / "s")
  )
  state, frozen, objective = trainer.initial_state(), trainer.frozen, trainer.exp.objective
  model, bank = trainer.exp.model, frozen["bank"]
  batch = {
    "image": jnp.asarray(
      np.stack([trainer.exp.splits.train[i]["image"] for i in range(16)]), jnp.float32
    )
    / 255.0,
    "label": jnp.asarray([trainer.exp.splits.train[i]["label"] for i in range(16)], jnp.int32),
  }
  aux_in = {base.FROZEN: frozen}
  adv = jax.jit(objective.generate)(
    state.params, state.model_state, aux_in, batch, jax.random.key(3), state.step
  )
  y, y_mc = np.asarray(batch["label"]), np.asarray(adv["y_mc"])
  logits = lambda x: base.forward(model, state.params, state.model_state, x, mode="eval").logits
  np.testing.assert_array_equal(y_mc, most_confusing_labels(logits(batch["image"]), batch["label"]))
  assert not np.any(y_mc == y)
  # x_n: a training image of class y_mc (synthetic data: no augmentation, so an exact bank row).
  images, starts, counts = (np.asarray(a) for a in (bank.images, bank.starts, bank.counts))
  for i, c in enumerate(y_mc):
    members = images[starts[c] : starts[c] + counts[c]].astype(np.float32) / 255.0
    assert np.any(np.all(np.abs(members - np.asarray(adv["x_n"][i])) < 1e-7, axis=(1, 2, 3))), i
  # Targeted PGD lowers CE towards each target; both stay in the eps ball and in [0, 1].
  ce = lambda x, t: np.asarray(attack_losses.cross_entropy(logits(x), t))
  eps = trainer.config.attack.eps
  for x0, x1, target in (
    (batch["image"], adv["x_a"], adv["y_mc"]),
    (adv["x_n"], adv["x_n_adv"], batch["label"]),
  ):
    before, after = ce(x0, target), ce(x1, target)
    assert np.all(after < before) and after.mean() < before.mean() - 0.01, (before, after)
    assert np.max(np.abs(np.asarray(x1) - np.asarray(x0))) <= eps + 1e-6
    assert 0.0 <= float(jnp.min(x1)) and float(jnp.max(x1)) <= 1.0

  # The loss equals an independent recomputation of the coded formula. Default bn = "code":
  # 3B = 48 rows over 8 "devices" = 8 separate train-mode passes of 6 rows (x_a 0-15, x 16-31,
  # x_n' 32-47), each normalised alone; the running statistics are chunk 0's pass's.
  assert objective.bn_policy.update.startswith("chunk 0 of [x_a; x; x_n'] in 8")
  value, aux = jax.jit(objective.loss)(
    state.params, state.model_state, aux_in, batch, adv, jax.random.key(4), state.step
  )
  x3 = jnp.concatenate([adv["x_a"], batch["image"], adv["x_n_adv"]])
  key0 = base.pass_key(jax.random.key(4), 0)
  teacher = agad.load(teachers[0], "latest")
  t_out = base.forward(
    teacher.model,
    teacher.variables["params"],
    {"batch_stats": teacher.variables["batch_stats"]},
    jnp.concatenate([batch["image"], adv["x_n"]]),
    mode="eval",
    taps=("features",),
  )
  tf = t_out.taps["features"]
  onehot = jax.nn.one_hot(batch["label"], 10)
  target = onehot * 0.5 + (1 - onehot) * 0.5 / 9

  def coded_loss(z, f, e):
    return (
      -jnp.mean(jnp.sum(target * jax.nn.log_softmax(z[:16]), -1))
      + mart_term(z[16:32], z[:16], batch["label"])
      + attention_l1(f[:16], tf[:16])
      + attention_l1(f[32:], tf[16:])
      + 2 * bml_triplet_loss(e[:16], e[16:32], e[32:], margin=0.03, lam_norm=0.001)
    )

  train_pass = jax.jit(
    lambda v: base.forward(
      model,
      state.params,
      state.model_state,
      v,
      mode="train",
      taps=("features", "embedding"),
      rng=key0,
    )
  )
  pieces = [train_pass(x3[i : i + 6]) for i in range(0, 48, 6)]
  cat = lambda get: jnp.concatenate([get(p) for p in pieces])
  np.testing.assert_allclose(
    value,
    coded_loss(
      cat(lambda p: p.logits), cat(lambda p: p.taps["features"]), cat(lambda p: p.taps["embedding"])
    ),
    rtol=1e-5,
  )
  assert_close(aux.model_state, pieces[0].model_state)
  assert set(aux.passes) == {"adv", "clean", "neg_adv"} and aux.metrics["agkd_mart"] > 0
  # bn = "mixed": one train-mode pass over the 48 rows; the statistics of all of them. With
  # the paper's Eq. 9 (mart_term off) and step count (an override of the attack's steps).
  mixed = agkd.agkd_bml(
    model,
    _student(
      teachers[0],
      **{
        "objective.agkd_bml.bn": "mixed",
        "objective.agkd_bml.mart_term": False,
        "objective.agkd_bml.steps": 7,
      },
    ),
  )
  mixed.frozen(trainer.exp.splits)  # loads its teacher slot (the same teacher as aux_in's)
  value_m, aux_m = jax.jit(mixed.loss)(
    state.params, state.model_state, aux_in, batch, adv, jax.random.key(4), state.step
  )
  out = train_pass(x3)
  np.testing.assert_allclose(
    value_m,
    coded_loss(out.logits, out.taps["features"], out.taps["embedding"])
    - mart_term(out.logits[16:32], out.logits[:16], batch["label"]),
    rtol=1e-5,
  )
  assert float(aux_m.metrics["agkd_mart"]) == 0.0
  assert_close(aux_m.model_state, out.model_state)
  mean = lambda s: np.concatenate([np.ravel(l) for l in jax.tree.leaves(s)])
  assert np.max(np.abs(mean(aux.model_state) - mean(aux_m.model_state))) > 1e-3


@pytest.mark.slow
def test_teacher_frozen_unchanged_not_checkpointed_and_resume_with_another_refused(
  teachers, tmp_path
):
  teacher_dir = str(tmp_path / "teacher")
  shutil.copytree(teachers[0], teacher_dir)
  before = agad.load(teacher_dir, "latest")
  student_dir = str(tmp_path / "student")
  trainer = loop.Trainer(_student(teacher_dir, stop_after_steps=2), student_dir)
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
  assert meta["frozen"]["bank"] == {"examples": 80}
  metrics = [json.loads(l) for l in open(os.path.join(student_dir, "metrics.jsonl"))]
  terms = [m for m in metrics if "train/agkd_attention_l1" in m]
  assert terms and all(np.isfinite(m["train/loss"]) and m["train/agkd_mart"] > 0 for m in terms)

  # Another teacher in the same workdir field: refused on resume.
  shutil.rmtree(teacher_dir)
  shutil.copytree(teachers[1], teacher_dir)
  with pytest.raises(ValueError, match="(?s)refusing to resume.*frozen.teacher.params_hash"):
    loop.Trainer(_student(teacher_dir), student_dir).run()
  # The student loads and evaluates without its teacher.
  shutil.rmtree(teacher_dir)
  loaded = agad.load(student_dir, "latest")
  assert loaded.logits_fn(jnp.zeros((2, 8, 8, 1))).shape == (2, 10)
  variants = loaded.objective().adaptive_loss(loaded.model, loaded.variables)
  x, y = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1)), jnp.array([0, 1, 2, 3])
  z = loaded.logits_fn(x)  # "mc": targeted CE towards the runner-up class, ascended as -CE
  expected = -attack_losses.cross_entropy(z, most_confusing_labels(z, y))
  assert set(variants) == {"mc"}
  np.testing.assert_allclose(variants["mc"](x, y), expected, rtol=1e-5)


@pytest.mark.parametrize(
  "key,value,field",
  [
    ("data.name", "fashion_mnist", "data.name = 'fashion_mnist'"),
    ("data.num_classes", 5, "number of classes = 5"),
    ("model.name", "resnet18", "model.name = 'resnet18'"),
    ("model.mean", [0.25], r"config.model.mean = \(0.25,\)"),
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
  with pytest.raises(ValueError, match=f"(?s){field}.*config.objective.agkd_bml.teacher.workdir"):
    loop.Trainer(_student(teacher_dir), str(tmp_path / "s"))
  assert not os.path.exists(tmp_path / "s" / "checkpoints")


def test_a_missing_teacher_names_the_field(tmp_path):
  with pytest.raises(ValueError, match="config.objective.agkd_bml.teacher.workdir is empty"):
    loop.Trainer(_student(""), str(tmp_path / "a"))
  with pytest.raises(
    FileNotFoundError, match="config.objective.agkd_bml.teacher.workdir = .*no config.json"
  ):
    loop.Trainer(_student(str(tmp_path / "nowhere")), str(tmp_path / "b"))


def test_cifar10_wrn28_10_agkd_bml_is_the_codes_recipe():
  from configs import cifar10

  c = cifar10.get_config("wrn28_10,agkd_bml")
  assert (c.model.name, c.objective.name, c.num_epochs, tuple(c.optim.boundaries)) == (
    "wrn28_10",
    "agkd_bml",
    200,
    (100, 150),
  )
  assert (c.optim.lr, c.optim.momentum, c.optim.weight_decay, c.batch_size) == (0.1, 0.9, 2e-4, 128)
  assert tuple(c.model.mean) == tuple(c.model.std) == (0.5, 0.5, 0.5)  # the code's [-1, 1] inputs
  # The code's eps 8/255*2 and step 2/255*2 on [-1, 1] are 8/255 and 2/255 in pixels.
  assert (c.attack.eps, c.attack.step_size, c.attack.steps, c.attack.random_start) == (
    8 / 255,
    2 / 255,
    10,
    "uniform",
  )
  assert c.validation.attack.eps == c.eval.eps == 8 / 255
  assert c.objective.agkd_bml.to_dict() == agkd.DEFAULTS.to_dict() and c.init.step == "latest"
  assert cifar10.get_config("resnet18,agkd_bml").num_epochs == 100  # the recipe is WRN-28-10's only
