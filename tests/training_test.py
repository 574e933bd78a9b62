"""Training: sharded == single device, no recompiles, exact resume (also after SIGKILLs),
divergence and config errors."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from agad import checkpoint as ckpt_lib
from agad import models
from agad.objectives import pgd_at, standard
from agad import sharding
from agad.training import loop, state as state_lib, step as step_lib
from tests.helpers import tiny_config
from tests.smoke import load_tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(objective_name="pgd_at"):
  config = tiny_config()
  model = models.build_model("tiny_bn", num_classes=10, mean=(0.5,), std=(0.25,))
  objective = pgd_at(model, config) if objective_name == "pgd_at" else standard(model)
  tx = optax.sgd(0.1, momentum=0.9)
  key = jax.random.key(0)
  x = jax.random.uniform(key, (16, 8, 8, 1))
  y = jax.random.randint(jax.random.key(1), (16,), 0, 10)
  batch = {"image": x, "label": y}
  state = state_lib.init_train_state(model, objective, tx, batch, jax.random.key(2), ema_decay=0.9)
  return model, objective, tx, state, batch


def _jitted_step(objective, tx, mesh):
  fn = step_lib.make_train_step(objective, tx, ema_decay=0.9)
  rep, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
  return jax.jit(fn, in_shardings=(rep, data), out_shardings=(rep, rep)), rep, data


def test_sharded_step_equals_single_device_step():
  assert jax.device_count() == 4, "conftest should provide 4 CPU devices"
  _, objective, tx, state, batch = _setup()
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.make_mesh(devices)
    step, rep, data = _jitted_step(objective, tx, mesh)
    s = jax.device_put(state, rep)
    for _ in range(2):
      s, metrics = step(s, jax.device_put(batch, data))
    results.append((jax.device_get(s), jax.device_get(metrics)))
  (s1, m1), (s4, m4) = results
  # SyncBN: the 4-device program computes BN statistics over the global batch.
  chex.assert_trees_all_close(s1.params, s4.params, atol=2e-5, rtol=2e-5)
  chex.assert_trees_all_close(s1.model_state, s4.model_state, atol=2e-5, rtol=2e-5)
  chex.assert_trees_all_close(s1.ema_params, s4.ema_params, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
  # The step really changed things (the comparison is not vacuous).
  assert not np.allclose(jax.tree.leaves(s1.params)[0], jax.tree.leaves(state.params)[0])
  assert int(s4.step) == 2


@pytest.mark.parametrize("spec", ["again", "fsr"])
@pytest.mark.slow
def test_smallcnn_bn_defense_gradient_is_the_same_on_1_and_4_devices(spec):
  """The loss gradient of a train step in the suite's cheap-compile mode: the
  conv-BN-ReLU stage below SmallCNN-BN's first max pool got device-count-dependent (and
  wrong) gradients when XLA recomputed the BN multiply-add differently for the max and for
  its gradient's mask (docs/results/numerics.md)."""
  from agad.training import builders

  config = tiny_config(spec, "smallcnn_bn", **{"data.image_shape": (16, 16, 1), "batch_size": 8})
  exp = builders.build_experiment(config)
  objective = exp.objective
  keys = jax.random.split(jax.random.key(0), 3)
  batch = {
    "image": jax.random.uniform(keys[0], (8, 16, 16, 1)),
    "label": jax.random.randint(keys[1], (8,), 0, 10),
  }
  state = state_lib.init_train_state(
    exp.model, objective, optax.sgd(0.1), batch, keys[2], ema_decay=0.0
  )

  def grads(state, batch):  # the loss at the clean batch (the attack changes nothing here)
    def loss(params):
      args = (state.model_state, state.aux_state, batch, batch["image"], state.key, state.step)
      return objective.loss(params, *args)[0]

    return jax.grad(loss)(state.params)

  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.make_mesh(devices)
    rep, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
    fn = jax.jit(grads, in_shardings=(rep, data), out_shardings=rep)
    results.append(jax.device_get(fn(jax.device_put(state, rep), jax.device_put(batch, data))))
  chex.assert_tree_all_finite(results)
  # Not vacuous: gradient reaches the first stage (through the defense's heads).
  assert np.abs(results[0]["stage1_conv0"]["kernel"]).max() > 1e-3
  chex.assert_trees_all_close(results[0], results[1], rtol=1e-4, atol=1e-6)


def test_train_step_compiles_once():
  _, objective, tx, state, batch = _setup("standard")
  fn = step_lib.make_train_step(objective, tx, ema_decay=0.0)
  fn = jax.jit(chex.assert_max_traces(fn, n=1))
  for i in range(3):
    state, _ = fn(state, {"image": batch["image"] * (i + 1) / 4, "label": batch["label"]})


def test_pgd_at_generate_uses_eval_bn_and_does_not_touch_stats():
  from agad.attacks import iterative
  from agad.objectives import base

  model, objective, _, state, batch = _setup()
  # Running statistics far from this batch's, so that the two BN modes attack different
  # functions (at init they are mean 0 / variance 1).
  model_state = jax.tree.map(lambda v: v + 0.7, state.model_state)
  # A step past the eps warm-up: the full radius (at step 0 the ramp makes it eps / 226).
  adv = objective.generate(
    state.params, model_state, state.aux_state, batch, jax.random.key(0), 10**6
  )
  attack = tiny_config().attack
  assert float(jnp.abs(adv - batch["image"]).max()) <= attack.eps + 1e-6

  def pgd_with(mode):
    fn = base.logits_fn_for(model, state.params, model_state, mode=mode)
    return iterative.pgd(
      fn,
      batch["image"],
      batch["label"],
      jax.random.key(0),
      eps=attack.eps,
      step_size=attack.step_size,
      steps=attack.steps,
      norm=attack.norm,
      random_start=attack.random_start,
      loss="ce",
      driver=attack.driver,
    )

  with_running, with_batch = pgd_with("eval"), pgd_with("batch")
  # The two BN modes give different adversarials here (the check below can tell) ...
  assert float(jnp.abs(with_running - with_batch).max()) > 1e-3
  # ... and generate's are those of the attack through the running statistics.
  np.testing.assert_allclose(adv, with_running, atol=1e-6)
  _, (new_model_state, _, _, _) = objective.loss(
    state.params, state.model_state, state.aux_state, batch, adv, jax.random.key(1), 0
  )
  # The loss pass (train mode) updates BN statistics; generate returned only images.
  assert not np.allclose(jax.tree.leaves(new_model_state)[0], jax.tree.leaves(state.model_state)[0])


def _final_params(workdir):
  import agad

  return jax.device_get(agad.load(workdir, "latest").variables)


@pytest.mark.slow
def test_stop_and_resume_equals_uninterrupted(tmp_path):
  config = tiny_config()
  full = loop.Trainer(config, str(tmp_path / "full"))
  full.run()
  assert full.train_traces == 1

  stopped = tiny_config(stop_after_steps=5)
  loop.Trainer(stopped, str(tmp_path / "resumed")).run()
  resumed = loop.Trainer(tiny_config(), str(tmp_path / "resumed"))
  resumed.run()
  assert resumed.train_traces == 1  # No recompilation after restore.
  a, b = _final_params(tmp_path / "full"), _final_params(tmp_path / "resumed")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.array_equal(x, y)


@pytest.mark.slow
def test_sigkill_during_a_save_and_in_training_resumes_bitwise(tmp_path):
  """``launch.train`` (async saves, a checkpoint every 2 steps) SIGKILLed while a checkpoint is
  being written, restarted, SIGKILLed at a random moment of training, restarted to the end:
  the final TrainState (params, optimiser state, BN statistics, EMA, step, PRNG key), iterator
  state and kept steps equal an uninterrupted run's. tools/chaos_train.py does 20 kills."""
  chaos = load_tool("chaos_train")
  overrides = [
    "--config.data.name=synthetic",
    "--config.data.num_train=96",
    "--config.data.num_test=32",
    "--config.data.val_size=16",
    "--config.data.image_shape=(8, 8, 1)",
    "--config.batch_size=16",
    "--config.num_epochs=2",
    "--config.attack.steps=2",
    "--config.validation.attack.steps=1",
    "--config.validation.batch_size=16",
    *chaos.TRAIN_OVERRIDES,
  ]
  command = lambda workdir: chaos.train_command(
    workdir, "configs/fashion_mnist.py:tiny_bn,pgd_at,smoke", overrides
  )
  # The launches inherit the test run's compilation cache and cheap-compile setting
  # (conftest.py): the reference compiles, the three restarts load the same programs.
  env = chaos.child_env()
  figures = chaos.chaos_train(
    str(tmp_path),
    kills=2,
    seed=0,
    command=command,
    env=env,
    kinds=["save", "train"],
    log=lambda *_: None,
  )
  assert figures["kills"] == 2, "a launch finished before its kill; lengthen the run"
  first = figures["kill_records"][0]
  assert first.during_save and first.left_behind, "the save kill missed the write"
  # Lost work: at most the steps since the last committed save (2) plus those trained while
  # an async save was still being written (2).
  assert all(0 <= lost <= 4 for lost in figures["recomputed"]), figures["recomputed"]
  assert figures["mismatches"] == []
  (ref, ref_step), (killed, killed_step) = (
    ckpt_lib.read_state(str(tmp_path / w), "latest", with_key=True) for w in ("reference", "killed")
  )
  assert ref_step == killed_step == figures["total_steps"] == 10
  chex.assert_trees_all_equal(killed, ref)


def test_finished_workdir_returns_promptly_and_changed_trajectory_is_refused(tmp_path):
  workdir = str(tmp_path / "w")
  loop.Trainer(tiny_config(num_epochs=1), workdir).run()
  again = loop.Trainer(tiny_config(num_epochs=1), workdir)
  again.run()
  assert again.train_traces == 0  # Nothing trained, nothing compiled.
  with pytest.raises(ValueError, match=r"optim.lr: 0.01 -> 0.5"):
    loop.Trainer(tiny_config(num_epochs=1, **{"optim.lr": 0.5}), workdir).run()


def test_non_finite_loss_stops_without_saving(tmp_path):
  workdir = str(tmp_path / "nan")
  config = tiny_config(**{"optim.lr": 1e30, "log_every_steps": 1})
  with pytest.raises(
    FloatingPointError,
    match=r"non-finite training (loss|grad_norm) \(\S+\) at step \d+; "
    r"no checkpoint was saved yet\. .*--config\.optim\.grad_clip=1\.0 "
    r"and a lower --config\.optim\.lr \(now 1e\+30",
  ):
    loop.Trainer(config, workdir).run()
  ckdir = os.path.join(workdir, "checkpoints")
  assert not [d for d in os.listdir(ckdir) if d.isdigit()]


def test_nan_gradient_stops_at_its_step_and_the_last_checkpoint_restores(tmp_path):
  """A NaN gradient (the loss still finite) is named at its own step, not at the next step's
  NaN loss; no checkpoint follows it and the last one restores."""
  import agad

  workdir = str(tmp_path / "nan_grad")
  trainer = loop.Trainer(
    tiny_config(**{"checkpoint.every_steps": 2, "log_every_steps": 4}), workdir
  )
  step_fn = trainer.train_step

  def nan_gradient_at_step_3(state, batch, frozen):
    state, metrics = step_fn(state, batch, frozen)
    if int(state.step) == 3:  # what a NaN gradient does to this update: NaN params
      state = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
      metrics = dict(metrics, grad_norm=jnp.full((), jnp.nan, jnp.float32))
    return state, metrics

  trainer.train_step = nan_gradient_at_step_3
  with pytest.raises(loop.NonFiniteError) as error:
    trainer.run()
  message = str(error.value)
  assert "\n" not in message
  # Logged every 4 steps: the check still names step 3 and the gradient norm.
  assert message.startswith(
    "non-finite training grad_norm (nan) at step 3; the last good "
    f"checkpoint (step 2) is kept in {os.path.join(workdir, 'checkpoints')}."
  )
  for advice in (
    "--config.optim.grad_clip=1.0",
    "a lower --config.optim.lr (now 0.01, e.g. 0.001)",
    f"--config.init.workdir={workdir} --config.init.step=2",
  ):
    assert advice in message
  assert sorted(d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()) == ["2"]
  raw, step = ckpt_lib.read_state(workdir, "latest")
  assert step == 2
  assert all(
    np.isfinite(x).all() for x in jax.tree.leaves(raw) if np.issubdtype(x.dtype, np.floating)
  )
  loaded = agad.load(workdir, "latest")
  assert loaded.step == 2
  assert np.isfinite(np.asarray(loaded.logits_fn(np.zeros((4, 8, 8, 1), np.float32)))).all()


def test_indivisible_batch_is_a_clear_error():
  with pytest.raises(ValueError, match="does not divide by the 4 devices"):
    sharding.check_divisible(18, sharding.make_mesh())


@pytest.mark.parametrize("spec", ["standard", "trades", "mart", "alp", "iat", "cas", "trades+awp"])
@pytest.mark.slow
def test_every_objective_trains_through_the_loop(tmp_path, spec):
  """A few steps of each objective via train_and_evaluate: finite loss, params move."""
  config = tiny_config(spec, num_epochs=1)
  trainer = loop.Trainer(config, str(tmp_path / spec.replace("+", "_")))
  init = jax.device_get(trainer.initial_state().params)
  final = trainer.run()
  assert trainer.train_traces == 1
  moved = [
    not np.allclose(a, b)
    for a, b in zip(jax.tree.leaves(init), jax.tree.leaves(jax.device_get(final.params)))
  ]
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(final.params)))
  assert sum(moved) > len(moved) // 2
  lines = [json.loads(l) for l in open(tmp_path / spec.replace("+", "_") / "metrics.jsonl")]
  val = [l for l in lines if "val/robust_accuracy" in l]
  assert val
  # CAS declares an adaptive loss: validation also attacks it and keeps the worst case.
  assert all(("val/pgd_robust_accuracy" in l) == (spec == "cas") for l in val)
  assert all(l["val/robust_accuracy"] <= l.get("val/pgd_robust_accuracy", 1.0) for l in val)


def test_init_from_copies_maps_and_freezes(tmp_path):
  source = str(tmp_path / "teacher")
  loop.Trainer(tiny_config(num_epochs=1), source).run()
  import agad

  teacher = jax.device_get(agad.load(source, "latest").variables)

  config = tiny_config(num_epochs=1, **{"init.workdir": source, "init.freeze": "^stem_"})
  student = loop.Trainer(config, str(tmp_path / "student"))
  start = jax.device_get(student.initial_state())
  for a, b in zip(jax.tree.leaves(start.params), jax.tree.leaves(teacher["params"])):
    assert np.array_equal(a, b)
  chex.assert_trees_all_equal(start.model_state, {"batch_stats": teacher["batch_stats"]})
  final = jax.device_get(student.run().params)
  np.testing.assert_array_equal(
    final["stem_conv"]["kernel"], teacher["params"]["stem_conv"]["kernel"]
  )
  assert not np.allclose(final["classifier"]["kernel"], teacher["params"]["classifier"]["kernel"])

  # A param_map pointing at a missing source path is an error naming it.
  bad = tiny_config(num_epochs=1, **{"init.workdir": source, "init.param_map": "classifier=head"})
  with pytest.raises(ValueError, match="classifier/bias <- head/bias: missing in source"):
    loop.Trainer(bad, str(tmp_path / "bad")).initial_state()


def test_eps_warmup_ramps_the_training_attack():
  from agad.objectives import defaults

  config = tiny_config(
    **{"attack.eps_warmup_steps": 4, "attack.eps": 0.2, "attack.step_size": 0.05}
  )
  attack = defaults.TrainingAttack(None, config, None)
  for step, frac in ((0, 0.25), (1, 0.5), (3, 1.0), (10, 1.0)):
    eps, size = attack.radius(step)
    np.testing.assert_allclose([eps, size], [0.2 * frac, 0.05 * frac], rtol=1e-6)
  model, objective, _, state, batch = _setup()
  objective = pgd_at(model, config)
  adv = objective.generate(
    state.params, state.model_state, {}, batch, jax.random.key(0), jnp.int32(0)
  )
  assert float(jnp.abs(adv - batch["image"]).max()) <= 0.05 + 1e-6


def test_best_checkpoint_metric_depends_on_objective(tmp_path):
  from agad import checkpoint as ckpt_lib

  assert ckpt_lib.best_metric_for(tiny_config("standard")) == "val/clean_accuracy"
  assert ckpt_lib.best_metric_for(tiny_config("trades")) == "val/robust_accuracy"
  with pytest.raises(ValueError, match="best_metric"):
    ckpt_lib.best_metric_for(tiny_config("trades", **{"checkpoint.best_metric": "test/acc"}))
  # Step 1 is the robust best, step 2 the clean best.
  metrics = {
    1: {"val/clean_accuracy": 0.7, "val/robust_accuracy": 0.4},
    2: {"val/clean_accuracy": 0.9, "val/robust_accuracy": 0.1},
  }
  for metric, expected in (("val/clean_accuracy", 2), ("val/robust_accuracy", 1)):
    directory = str(tmp_path / metric.replace("/", "_"))
    ckpt = ckpt_lib.Checkpointer(directory, best_metric=metric, async_save=False)
    for step, m in metrics.items():
      ckpt.save(
        step,
        {"w": np.full((2,), step, np.float32)},
        data_state={},
        meta={"metrics": m, "best_metric": metric},
      )
    ckpt.close()
    # The metric recorded in the metadata wins over the reader's default.
    assert ckpt_lib.resolve_step(directory, "best", best_metric="val/robust_accuracy") == expected
    assert ckpt_lib.resolve_step(directory, "best", best_metric="val/clean_accuracy") == expected


def test_validation_step_adds_the_adaptive_attack_and_takes_the_worst_case():
  """A model whose logits carry no input gradient fools PGD-CE; the objective's adaptive
  loss (same logits, gradient intact) breaks it, and validation counts the worst case."""
  import types
  import flax.linen as nn

  class MaskedLinear(nn.Module):
    @nn.compact
    def __call__(self, x, train=False, labels=None, norm_ctx=None):
      return jax.lax.stop_gradient(nn.Dense(3, name="fc")(x.reshape(x.shape[0], -1)))

  def adaptive_factory(model, variables):
    del model
    fc = variables["params"]["fc"]

    def loss(x, labels):
      logits = x.reshape(x.shape[0], -1) @ fc["kernel"] + fc["bias"]
      return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1)[:, 0]

    return {"": loss}

  model = MaskedLinear()
  x = jax.random.uniform(jax.random.key(0), (16, 2, 2, 1))
  params = model.init(jax.random.key(1), x)["params"]
  labels = jnp.argmax(model.apply({"params": params}, x), -1)  # every clean verdict correct
  batch = {"image": x, "label": labels}
  cfg = types.SimpleNamespace(eps=0.5, step_size=0.2, steps=5, norm="linf", random_start="none")
  plain = step_lib.make_eval_step(model, cfg)(params, {}, batch, jax.random.key(2))
  out = step_lib.make_eval_step(model, cfg, adaptive_factory)(params, {}, batch, jax.random.key(2))
  assert bool(plain["clean"].all()) and bool(plain["robust_pgd"].all())  # PGD-CE is fooled
  np.testing.assert_array_equal(plain["robust"], plain["robust_pgd"])
  np.testing.assert_array_equal(out["robust_pgd"], plain["robust_pgd"])
  assert bool(jnp.all(out["robust"] <= out["robust_pgd"]))
  assert int(out["robust"].sum()) < 8, "the adaptive attack should break most points"


def test_validation_at_chance_warns_that_the_run_collapsed_and_says_the_fix(monkeypatch):
  from types import SimpleNamespace

  val = lambda clean, n=2000: {"val/clean_accuracy": clean, "val/robust_accuracy": 0.0, "val/n": n}
  message = loop.chance_warning(val(0.106), 10, 0.05, 0, 156)
  assert "validation clean accuracy 0.1060 is at chance (1/10 = 0.1000)" in message
  assert "--config.optim.lr (now 0.05, e.g. 0.025) or another --config.seed (now 0)" in message
  assert loop.chance_warning(val(0.121), 10, 0.05, 0, 156) is None  # above 1/K + CHANCE_MARGIN
  assert loop.chance_warning(val(0.02), 100, 0.1, 1, 100) is not None
  assert loop.chance_warning(val(0.02), 100, 0.1, 1, 99) is None  # too early to tell
  assert loop.chance_warning(val(0.031), 100, 0.1, 1, 500) is None
  assert loop.chance_warning(val(0.51), 2, 0.1, 1, 500) is not None  # two classes: chance 0.5
  assert loop.chance_warning(val(0.0, n=0), 10, 0.1, 1, 500) is None  # nothing validated
  # The epoch's validation logs it.
  warnings = []
  monkeypatch.setattr(loop.logging, "warning", lambda fmt, *a: warnings.append(fmt % a))
  trainer = SimpleNamespace(
    validate=lambda state: val(0.1),
    exp=SimpleNamespace(info=SimpleNamespace(num_classes=10)),
    config=SimpleNamespace(optim=SimpleNamespace(lr=0.05), seed=3),
  )
  writer = SimpleNamespace(write=lambda step, values: None)
  assert loop.Trainer._validate_and_log(trainer, 156, None, writer) == val(0.1)
  assert len(warnings) == 1 and "another --config.seed (now 3)" in warnings[0]
  trainer.validate = lambda state: val(0.5)
  loop.Trainer._validate_and_log(trainer, 312, None, writer)
  trainer.validate = lambda state: val(0.1)
  loop.Trainer._validate_and_log(trainer, 12, None, writer)  # a smoke run's first epoch
  assert len(warnings) == 1
