"""SVHN (TFDS svhn_cropped, ArrayRecord). FSR's SVHN setting: step eps/8, lr 0.01.

``:resnet18,fsr`` is FSR's SVHN recipe (wkim97/FSR train.py with ``--alpha 0.125 --lr
0.01``) with this file's defaults unchanged.
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.data.name = "svhn_cropped"
  c.data.val_size = 1000
  c.model.name = "resnet18"
  c.num_epochs = 100
  c.attack.step_size = 1 / 255
  c.optim.lr = 0.01
  c.optim.boundaries = (75, 90)
  return common.apply_arg(c, arg)
