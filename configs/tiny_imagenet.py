"""Tiny ImageNet (64x64, 200 classes) from a user directory (tiny-imagenet-200 layout)."""

from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.data.name = "tiny_imagenet"
  c.data.val_size = 2000
  c.model.name = "wrn16_8"
  # Raw [0, 1], as the CIFAR/SVHN recipes (no released Tiny ImageNet code).
  c.model.input_norm = "none"
  c.num_epochs = 100
  c.optim.boundaries = (75, 90)
  return common.apply_arg(c, arg)
