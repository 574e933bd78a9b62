"""SVHN (TFDS svhn_cropped, ArrayRecord). FSR's SVHN setting: step eps/8, lr 0.01.

``:resnet18,fsr`` is FSR's SVHN recipe (wkim97/FSR train.py with ``--alpha 0.125 --lr
0.01``) with this file's defaults unchanged.

AFA (``agad/defenses/afa.py``): ``:wrn16_8,afa`` (stage I: 100 epochs, lr 0.01 x0.1 at 75
and 90, the paper's SVHN setting; ladder {0, 1, 2, 4, 8}/255), then ``:wrn16_8,afa_stage2
--config.init.workdir=<stage-I run>`` (20 epochs, lr 0.001 x0.1 at 10; backbone frozen).
Paper (Table 1, SVHN, WRN-16-8, PGD at eps 0/1/2/4/8 /255): PGD-AT+AFA 98.1 / 93.1 / 87.8 /
75.4 / 46.4 (PGD-AT 93.0 / 83.7 / 77.4 / 68.3 / 46.5); TRADES+AFA 97.0 / 89.0 / 88.4 /
77.6 / 54.2.
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.data.name = "svhn_cropped"
  c.data.val_size = 1000
  c.model.name = "resnet18"
  c.model.input_norm = "none"  # FSR train.py:75-80: ToTensor only, raw [0, 1] (docs/recipes.md).
  c.num_epochs = 100
  c.attack.step_size = 1 / 255
  c.optim.lr = 0.01
  c.optim.boundaries = (75, 90)
  return common.apply_arg(c, arg)  # with AFA stage II's recipe (afa_stage2.STAGE2_RECIPES)
