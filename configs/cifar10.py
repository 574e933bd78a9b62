"""CIFAR-10 (TFDS ArrayRecord; prepare with python -m launch.prepare_data --dataset=cifar10).

Defaults follow the seed papers' CIFAR-10 setting: eps 8/255, PGD-10 step 2/255,
SGD 0.9 / wd 5e-4, batch 128, lr 0.1 decayed x0.1 at epochs 75 and 90 of 100.

FSR (Kim et al. CVPR 2023, wkim97/FSR train.py): ``:resnet18,fsr`` (and ``trades+fsr``,
``mart+fsr``) is the paper's recipe with this file's defaults unchanged (100 epochs, lr 0.1
x0.1 at 75 and 90, SGD 0.9, wd 5e-4, batch 128, PGD-10 eps 8/255 step 2/255 = eps/4,
uniform start; FSR's own fields in ``objective.fsr``). The code keeps the last epoch's
weights: evaluate ``--step=latest`` for parity.
"""

from configs import common


def cifar_config(name: str, arg: str | None):
  c = common.base_config()
  c.data.name = name
  c.data.val_size = 1000
  c.model.name = "resnet18"
  c.num_epochs = 100
  c.optim.boundaries = (75, 90)
  return common.apply_arg(c, arg)


def get_config(arg: str | None = None):
  return cifar_config("cifar10", arg)
