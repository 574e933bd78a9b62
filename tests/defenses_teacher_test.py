"""Frozen inputs beside the trained model: a teacher loaded once, never checkpointed; init.keep_init."""

import os
import shutil
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import agad
from agad import checkpoint, defenses
from agad.defenses import _teacher as teacher_lib
from agad.training import loop
from tests.helpers import tiny_config

# A distillation defense: PGD-AT + MSE to a frozen teacher's clean logits.
TOY_KD = textwrap.dedent("""
    import jax.numpy as jnp
    import ml_collections

    from agad.defenses._teacher import TeacherSlot
    from agad.objectives import base, defaults
    from agad.objectives.pgd_at import pgd_at

    DEFAULTS = ml_collections.ConfigDict()
    DEFAULTS.teacher_workdir = ""   # a finished run (test)
    DEFAULTS.weight = 1.0           # MSE weight (test)


    def objective(model, config):
      cfg = defaults.objective_config(config, "toy_kd", DEFAULTS)
      slot = TeacherSlot(cfg.teacher_workdir, "latest")
      inner = pgd_at(model, config)

      # The teacher arrives as aux_state[FROZEN]["teacher"], so the defense wraps the loss.

      def loss(params, model_state, aux_state, batch, adv, key, step):
        value, aux = inner.loss(params, model_state, aux_state, batch, adv, key, step)
        frozen = aux_state[base.FROZEN]
        t = slot.apply(frozen["teacher"], batch["image"]).logits
        mse = jnp.mean((aux.passes["adv"].logits - t) ** 2)
        return value + cfg.weight * mse, aux._replace(metrics={**aux.metrics, "kd_mse": mse})

      return inner._replace(name="toy_kd", loss=loss, frozen=slot.frozen)
    """)


@pytest.fixture()
def kd_module(tmp_path):
  folder = tmp_path / "defs"
  folder.mkdir()
  (folder / "toy_kd.py").write_text(TOY_KD)
  defenses.__path__.append(str(folder))
  yield
  defenses.__path__.remove(str(folder))
  sys.modules.pop("agad.defenses.toy_kd", None)


def _kd_config(teacher_dir, **kw):
  config = tiny_config("toy_kd", num_epochs=1, **kw)
  config.objective.toy_kd.teacher_workdir = teacher_dir
  return config


@pytest.mark.slow
def test_teacher_is_frozen_recorded_not_checkpointed_and_resume_checks_it(tmp_path, kd_module):
  teacher_dir, other_dir = str(tmp_path / "teacher"), str(tmp_path / "other")
  loop.Trainer(tiny_config("standard", num_epochs=1), teacher_dir).run()
  loop.Trainer(tiny_config("standard", num_epochs=1, seed=7), other_dir).run()
  teacher = teacher_lib.load_teacher(teacher_dir, "latest")
  assert teacher.params_hash == checkpoint.params_hash(agad.load(teacher_dir, "latest").variables)

  student_dir = str(tmp_path / "student")
  trainer = loop.Trainer(_kd_config(teacher_dir, stop_after_steps=2), student_dir)
  final = trainer.run()
  assert trainer.train_traces == 1
  assert jax.device_get(final.aux_state) == {}  # nothing of the teacher in the state
  raw, step = checkpoint.read_state(student_dir, "latest")
  assert step == 2 and not raw.get("aux_state")
  ckpt = checkpoint.Checkpointer(os.path.join(student_dir, "checkpoints"))
  meta = ckpt.read_meta(2)
  ckpt.close()
  assert meta["frozen"]["teacher"] == {
    "workdir": os.path.abspath(teacher_dir),
    "step": teacher.step,
    "params_hash": teacher.params_hash,
  }
  lines = open(os.path.join(student_dir, "metrics.jsonl")).read()
  assert '"train/kd_mse"' in lines

  # Resuming with another teacher (same workdir field, other weights) is refused.
  shutil.rmtree(teacher_dir)
  shutil.copytree(other_dir, teacher_dir)
  with pytest.raises(
    ValueError, match="(?s)refusing to resume.*frozen inputs.*frozen.teacher.params_hash"
  ):
    loop.Trainer(_kd_config(teacher_dir), student_dir).run()

  # The student loads and evaluates without its teacher.
  shutil.rmtree(teacher_dir)
  loaded = agad.load(student_dir, "latest")
  logits = loaded.logits_fn(jnp.zeros((2, 8, 8, 1)))
  assert logits.shape == (2, 10) and loaded.objective().name == "toy_kd"


def test_init_from_keeps_fresh_init_for_plugins_the_source_lacks(tmp_path):
  source = str(tmp_path / "source")
  loop.Trainer(tiny_config(num_epochs=1), source).run()
  config = tiny_config("cas", num_epochs=1, **{"init.workdir": source})
  with pytest.raises(
    ValueError,
    match="plugin_features/kernel <- plugin_features/kernel: missing in source.*keep_init",
  ):
    loop.Trainer(config, str(tmp_path / "a")).initial_state()
  config = tiny_config(
    "cas", num_epochs=1, **{"init.workdir": source, "init.keep_init": "^plugin_"}
  )
  trainer = loop.Trainer(config, str(tmp_path / "b"))
  start = jax.device_get(trainer.initial_state().params)
  fresh = jax.device_get(
    trainer.init_fn(jax.random.key(config.seed), trainer._sample_batch()).params
  )
  src = agad.load(source, "latest").variables["params"]
  np.testing.assert_array_equal(
    start["plugin_features"]["kernel"], fresh["plugin_features"]["kernel"]
  )
  np.testing.assert_array_equal(start["stem_conv"]["kernel"], src["stem_conv"]["kernel"])
  assert not np.array_equal(start["stem_conv"]["kernel"], fresh["stem_conv"]["kernel"])


# A defense drawing, per example, a training image of another class from a frozen ClassBank.
TOY_BANK = textwrap.dedent("""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from agad.data import ClassBank, sample_by_class
    from agad.objectives import base
    from agad.objectives.pgd_at import pgd_at

    DEFAULTS = ml_collections.ConfigDict()


    def frozen(splits):
      bank = ClassBank.from_source(splits.train, splits.info.num_classes, augment=splits.info.augment)
      return {"bank": bank}, {"bank": {"examples": int(bank.num_examples)}}


    def objective(model, config):
      inner = pgd_at(model, config)

      def loss(params, model_state, aux_state, batch, adv, key, step):
        value, aux = inner.loss(params, model_state, aux_state, batch, adv, key, step)
        other = (batch["label"] + 1) % 10
        drawn = sample_by_class(aux_state[base.FROZEN]["bank"], other, jax.random.fold_in(key, 9))
        out = base.forward(model, params, aux.model_state, drawn["image"], mode="batch")
        ce = base.cross_entropy_mean(out.logits, drawn["label"])
        match = jnp.mean((drawn["label"] == other).astype(jnp.float32))
        return value + ce, aux._replace(metrics={**aux.metrics, "bank_label_match": match})

      return inner._replace(name="toy_bank", loss=loss, frozen=frozen)
    """)


def test_a_class_bank_reaches_the_jitted_step_as_a_frozen_input(tmp_path):
  folder = tmp_path / "defs"
  folder.mkdir()
  (folder / "toy_bank.py").write_text(TOY_BANK)
  defenses.__path__.append(str(folder))
  try:
    workdir = str(tmp_path / "run")
    trainer = loop.Trainer(tiny_config("toy_bank", num_epochs=1, stop_after_steps=2), workdir)
    assert trainer.frozen_record == {"bank": {"examples": 80}}  # 96 synthetic minus 16 validation
    final = trainer.run()
    assert jax.device_get(final.aux_state) == {}
    lines = [l for l in open(os.path.join(workdir, "metrics.jsonl")) if "bank_label_match" in l]
    assert lines and all('"train/bank_label_match": 1.0' in l for l in lines)
  finally:
    defenses.__path__.remove(str(folder))
    sys.modules.pop("agad.defenses.toy_bank", None)


def test_input_normalisation_is_overridable_per_model():
  from agad import data as data_lib

  config = tiny_config()
  info = data_lib.dataset_info(config.data)
  model = defenses.build_model(config, info)
  assert model.mean == tuple(info.mean) and model.input_norm == "dataset"
  config.model.mean, config.model.std = (0.5,), (0.5,)  # AGKD-BML's [-1, 1] inputs
  config.model.input_norm = "per_image"  # ATAT's per-image standardisation
  model = defenses.build_model(config, info)
  assert (model.mean, model.std, model.input_norm) == ((0.5,), (0.5,), "per_image")
  config.model.input_norm = "per_dataset"
  with pytest.raises(ValueError, match="'per_dataset' is not one of"):
    defenses.build_model(config, info)
