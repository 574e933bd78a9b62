"""Configs: grammar, smoke shrinking, errors that name the fix."""

import importlib

import pytest

from configs import common

DATASETS = ("fashion_mnist", "cifar10", "cifar100", "svhn", "tiny_imagenet")


@pytest.mark.parametrize("name", DATASETS)
def test_every_dataset_config_builds_with_grammar(name):
  module = importlib.import_module(f"configs.{name}")
  c = module.get_config("resnet18,pgd_at,smoke")
  assert c.model.name == "resnet18" and c.objective.name == "pgd_at"
  assert c.data.max_train == 384 and c.attack.steps == 2
  d = module.get_config(None)
  assert d.data.max_train is None and d.attack.steps == 10


def test_transforms_parse_and_unknown_names_fail():
  from configs import fashion_mnist
  assert fashion_mnist.get_config("smallcnn,standard").objective.name == "standard"
  with pytest.raises(ValueError, match="unknown objective or defense 'tradez'; known objectives: .*trades"):
    fashion_mnist.get_config("smallcnn,tradez")
  with pytest.raises(ValueError, match="unknown model"):
    fashion_mnist.get_config("resnet99,pgd_at")
  with pytest.raises(ValueError, match="expected MODEL,OBJECTIVE"):
    fashion_mnist.get_config("a,b,c")


def test_config_is_locked_against_typos():
  from configs import fashion_mnist
  c = fashion_mnist.get_config("")
  c.lock()
  with pytest.raises(AttributeError):
    c.optim.learning_rate = 0.1
  with pytest.raises(TypeError):
    c.optim.lr = "fast"


def test_every_field_is_commented():
  """Each assignment in base_config carries a comment (the config is its own documentation)."""
  import inspect
  source = inspect.getsource(common.base_config).splitlines()
  bare = [l for l in source if l.strip().startswith("c.") and "=" in l and "#" not in l
          and "ConfigDict()" not in l and "update(" not in l]
  assert not bare, bare
