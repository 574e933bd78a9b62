"""CIFAR-100 (TFDS ArrayRecord): the CIFAR-10 recipe with 100 classes."""

from configs import cifar10


def get_config(arg: str | None = None):
  return cifar10.cifar_config("cifar100", arg)
