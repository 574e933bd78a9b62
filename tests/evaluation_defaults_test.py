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
  assert selected_weights(ml_collections.ConfigDict({})) == "params"  # old workdirs without the fields


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
  with pytest.raises(ValueError, match=r"attack.eps=0.05, validation.attack.eps=0.1, eval.eps=0.1.*allow_eps_mismatch"):
    builders.check_config(config)
  config.allow_eps_mismatch = True
  builders.check_config(config)
