"""Which weights evaluation reads, and the eval defaults living beside evaluation."""

import ml_collections
import pytest

from agad.evaluation.defaults import eval_defaults, selected_weights, weights_to_evaluate


def _run(ema_decay, use_ema=True):
  return ml_collections.ConfigDict({"ema_decay": ema_decay, "validation": {"use_ema": use_ema}})


def test_auto_evaluates_the_weights_validation_selected_on():
  e = eval_defaults()
  assert e.params == "auto"
  assert weights_to_evaluate(e, _run(0.999))[0] == "ema"
  assert weights_to_evaluate(e, _run(0.999, use_ema=False))[0] == "params"
  assert weights_to_evaluate(e, _run(0.0))[0] == "params"
  assert (
    selected_weights(ml_collections.ConfigDict({})) == "params"
  )  # old workdirs without the fields


def test_an_explicit_choice_that_differs_from_the_selection_is_said():
  e = eval_defaults()
  e.params = "params"
  weights, note = weights_to_evaluate(e, _run(0.999))
  assert weights == "params" and "selected on the ema weights" in note
  e.params = "ema"
  assert weights_to_evaluate(e, _run(0.999))[1].startswith("ema (the weights validation selected")
  e.params = "emma"
  with pytest.raises(ValueError, match="'emma'"):
    weights_to_evaluate(e, _run(0.0))


def test_eps_overrides_must_move_together():
  from agad.training import builders
  from tests.helpers import tiny_config

  config = tiny_config()
  builders.check_config(config)
  config.attack.eps = 0.05
  with pytest.raises(
    ValueError,
    match=r"attack.eps=0.05, validation.attack.eps=0.1, eval.eps=0.1.*allow_eps_mismatch",
  ):
    builders.check_config(config)
  config.allow_eps_mismatch = True
  builders.check_config(config)


def test_eval_overrides_from_a_fresh_config_merge_and_typos_fail():
  from configs import fashion_mnist
  from agad.evaluation.defaults import merged_eval_config

  saved = fashion_mnist.get_config("smallcnn,pgd_at").eval.to_dict()
  override = fashion_mnist.get_config("smallcnn,pgd_at").eval  # holds FieldReferences
  override.batch_size = 32
  merged = merged_eval_config(saved, override)
  assert merged.batch_size == 32 and merged.num_examples is None and merged.eps == 0.1
  with pytest.raises(KeyError, match=r"unknown fields \['batchsize'\]; known: .*batch_size"):
    merged_eval_config(saved, {"batchsize": 32})
  with pytest.raises(ValueError, match=r"eval.eps=3.0 is invalid"):
    merged_eval_config(saved, {"eps": 3.0})
  # Old saved configs may hold fields that no longer exist: ignored, not an error.
  assert merged_eval_config({**saved, "retired_field": 1}).eps == 0.1


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("attack.eps", 3.0, r"config.attack.eps=3.0 is invalid: a radius"),
    ("attack.steps", 0, r"config.attack.steps=0 is invalid: an integer >= 1"),
    ("validation.attack.step_size", -0.1, r"config.validation.attack.step_size=-0.1 is invalid"),
    ("optim.lr", float("nan"), r"config.optim.lr=nan is invalid"),
    ("attack.bn", "train", r"config.attack.bn='train' is invalid: eval \| batch"),
    ("ema_decay", 1.0, r"config.ema_decay=1.0 is invalid"),
  ],
)
def test_training_config_ranges_are_checked_up_front(field, value, match):
  from agad.training import builders
  from tests.helpers import tiny_config

  config = tiny_config(allow_eps_mismatch=True, **{field: value})
  with pytest.raises(ValueError, match=match):
    builders.check_config(config)


def test_a_backbone_that_cannot_take_the_images_is_refused():
  from agad import data as data_lib, defenses
  from agad.training import builders
  from configs import fashion_mnist

  config = fashion_mnist.get_config("vgg16,pgd_at")
  info = data_lib.dataset_info(config.data)
  with pytest.raises(
    ValueError,
    match=r"'vgg16' cannot take 'fashion_mnist' images of shape \(28, 28, 1\): "
    r"the feature maps at \['features', 'stage5'\] are empty",
  ):
    builders.check_model_fits_data(defenses.build_model(config, info), config, info)


def test_tfds_errors_other_than_not_prepared_are_not_relabelled():
  from agad.data import sources

  assert sources._looks_unprepared(FileNotFoundError("x"))
  assert sources._looks_unprepared(ValueError("Dataset cifar10 not found in /data"))
  assert not sources._looks_unprepared(PermissionError("permission denied: /data/cifar10"))
