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
  with pytest.raises(
    ValueError,
    match=r"unknown objective or defense 'tradez' \(did you mean trades\?\); known objectives: .*trades",
  ):
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
  bare = [
    l
    for l in source
    if l.strip().startswith("c.")
    and "=" in l
    and "#" not in l
    and "ConfigDict()" not in l
    and "update(" not in l
  ]
  assert not bare, bare


# Each paper recipe's input scaling is its official code's (docs/recipes.md has the source
# lines): raw [0, 1] for FSR, AGAIN, TRADES, MART (ToTensor, no Normalize) and AFA (no code:
# agad's choice, as the bases it is paired with); tf.image.per_image_standardization for ATAT;
# Normalize(0.5, 0.5), i.e. [-1, 1], for AGKD-BML. Every Fashion-MNIST row shares the
# dataset mean/std so that table rows compare.
RECIPE_SCALING = [
  ("cifar10", "resnet18,pgd_at", "raw"),
  ("cifar10", "resnet18,trades", "raw"),
  ("cifar10", "resnet18,mart", "raw"),
  ("cifar10", "resnet18,fsr", "raw"),
  ("cifar10", "resnet18,trades+fsr", "raw"),
  ("cifar10", "resnet18,again", "raw"),
  ("cifar10", "wrn34_10,again+awp", "raw"),
  ("cifar100", "wrn34_10,again+awp", "raw"),
  ("cifar10", "wrn28_10,afa", "raw"),
  ("cifar10", "wrn28_10,afa_stage2", "raw"),
  ("svhn", "resnet18,fsr", "raw"),
  ("svhn", "wrn16_8,afa", "raw"),
  ("tiny_imagenet", "wrn16_8,pgd_at", "raw"),
  ("cifar10", "wrn34_10,atat", "per_image"),
  ("cifar100", "wrn34_10,atat", "per_image"),
  ("cifar10", "wrn28_10,agkd_bml", "minus1_1"),
  ("fashion_mnist", "smallcnn,pgd_at", "dataset"),
  ("fashion_mnist", "smallcnn,fsr", "dataset"),
  ("fashion_mnist", "smallcnn,atat", "dataset"),
  ("fashion_mnist", "smallcnn,agkd_bml", "dataset"),
  ("fashion_mnist", "smallcnn_bn,afa", "dataset"),
]


@pytest.mark.parametrize("dataset,arg,scaling", RECIPE_SCALING)
def test_each_recipe_scales_its_inputs_as_its_code(dataset, arg, scaling):
  import jax.numpy as jnp
  import numpy as np

  from agad import defenses
  from agad.data import sources
  from agad.models import per_image_normalize

  c = importlib.import_module(f"configs.{dataset}").get_config(arg)
  info = sources.dataset_info(c.data)
  shape = (2,) + tuple(info.image_shape)
  x = jnp.linspace(0.0, 1.0, int(np.prod(shape))).reshape(shape) ** 2
  model = defenses.build_model(c, info)  # the model applies the scaling: attacks stay in [0, 1]
  prepared = model.apply({}, x, method=lambda m, v: m.prepare(v))
  expected = {
    "raw": x,
    "minus1_1": 2.0 * x - 1.0,
    "per_image": per_image_normalize(x),
    "dataset": (x - jnp.asarray(info.mean)) / jnp.asarray(info.std),
  }[scaling]
  np.testing.assert_allclose(prepared, expected, rtol=1e-5, atol=1e-6)
