"""CIFAR-100 (TFDS ArrayRecord): the CIFAR-10 recipe with 100 classes.

``wrn34_10,again+awp`` gets AGAIN's recipe (``cifar10._again_recipe``); its ASE heads, like
the classifier, have 100 outputs (the official code hard-codes 10).
"""

from configs import cifar10


def get_config(arg: str | None = None):
  return cifar10.cifar_config("cifar100", arg)
