"""CIFAR-10 (TFDS ArrayRecord; prepare with python -m launch.prepare_data --dataset=cifar10).

Defaults follow the seed papers' CIFAR-10 setting: eps 8/255, PGD-10 step 2/255,
SGD 0.9 / wd 5e-4, batch 128, lr 0.1 decayed x0.1 at epochs 75 and 90 of 100, raw [0, 1]
inputs (``model.input_norm = none``, the FSR/AGAIN/TRADES/MART codes' scaling; ATAT and
AGKD-BML recipes set their codes' own; docs/recipes.md lists each with its source line).

FSR (Kim et al. CVPR 2023, wkim97/FSR train.py): ``:resnet18,fsr`` (and ``trades+fsr``,
``mart+fsr``) is the paper's recipe with this file's defaults unchanged (100 epochs, lr 0.1
x0.1 at 75 and 90, SGD 0.9, wd 5e-4, batch 128, PGD-10 eps 8/255 step 2/255 = eps/4,
uniform start; FSR's own fields in ``objective.fsr``). The code keeps the last epoch's
weights: evaluate ``--step=latest`` for parity.

AGKD-BML (Wang et al. ICCV 2021, hongw579/AGKD-BML main.py/argument.py): ``:wrn28_10,agkd_bml``
is the code's recipe (``agad.defenses.agkd_bml.recipe``): 200 epochs, lr 0.1 x0.1 at 100 and 150, SGD 0.9, wd 2e-4, batch 128,
inputs normalised to [-1, 1] (``model.input_norm = dataset``, ``model.mean = std = 0.5``), both targeted attacks PGD-10 at
eps 8/255, step 2/255 in pixels (the code's 16/255 and 4/255 on [-1, 1]), uniform start;
AGKD-BML's own fields in ``objective.agkd_bml`` (teacher.workdir required). Its teacher is
``:wrn28_10,standard`` with the same schedule and normalisation and label smoothing 0.5
over the other classes (docs/defenses/agkd_bml.md has the two commands). Paper (Table 1, 2-step
training): clean 91.99, PGD-20 71.02, AA 37.07; AGKD-BML-7: 86.25 / 57.30 / 50.59; Table 5
(10 steps + MART, as coded, WRN-28-10): AA 50.80.

ATAT (Li et al., lizhuorong/Adversarial-Robustness-via-Attention-Transfer cifar10/config.json,
train_tsf.py): ``:wrn34_10,atat`` (also in cifar100.py) is the code's recipe
(``agad.defenses.atat.recipe``). Its network is
Madry's WRN (5 units per stage, widths 16/160/320/640: WRN-34-10's layout; Madry's leaky
ReLU 0.1 and avg-pool + zero-pad shortcuts differ from agad's ReLU and 1x1-conv shortcuts),
per-image standardisation inside the model (``model.input_norm = per_image``), batch 32
(64 images per BN batch after [x; x']), 400k steps, lr 0.1 x0.1 at steps 40k and 60k
(converted to epochs of the 49k carved train images), SGD 0.9, wd 2e-4, PGD-7 eps 8/255
step 2/255 uniform start (ATAT's own ``objective.atat.steps = 7``). The code starts the
student from random init and restores only the teacher and its ``global_step`` (70000;
train_tsf.py:61-65, 90, 109-110), so its lr sits at 0.001 throughout; the code variants
(``objective.atat.student_start = "code"``) start the schedule at the agad teacher's step
(100 epochs x 382 = 38,200 steps: lr 0.1 for the first 1,800 steps); for the code's lr,
``--config.optim.lr=0.001 --config.optim.schedule=constant`` (docs/defenses/atat.md).
Teacher: ``:wrn34_10,standard --config.model.input_norm=per_image`` (docs/defenses/atat.md has the
two commands). Paper Table 1 (PGD-20 at eps 8/255, train-mode BN at test time, no AA):
clean 91.89, FGSM 76.74, PGD-7 70.15, PGD-20 63.81 (AT-PGD 87.25 / 45.87).

AFA (Wang et al., no official code; ``agad/defenses/afa.py``): ``:wrn28_10,afa`` (stage I)
is this file's schedule unchanged (100 epochs, lr 0.1 x0.1 at 75 and 90, ladder
{0, 1, 2, 4, 8}/255), then ``:wrn28_10,afa_stage2 --config.init.workdir=<stage-I run>``
(20 epochs, lr 0.01 x0.1 at 10; the paper's "factor 0.9" read as 0.1; backbone frozen).
Paper (Tables 1, 3, CIFAR-10, WRN-28-10, PGD at eps 0/1/2/4/8 /255): PGD-AT+AFA 95.8 /
87.0 / 83.9 / 72.6 / 50.0 (PGD-AT 86.9 / 81.5 / 78.5 / 68.8 / 46.2), TRADES+AFA 95.4 / 86.8
/ 82.7 / 72.1 / 52.6; at 8/255 PGD-AT+AFA FGSM 81.1, C&W 48.3, PGD+adaptive 48.2.
"""

from configs import common


def cifar_config(name: str, arg: str | None):
  c = common.base_config()
  c.data.name = name
  c.data.val_size = 1000
  c.model.name = "resnet18"
  # Raw [0, 1] pixels, as the FSR, AGAIN, TRADES and MART codes feed them (ToTensor and no
  # Normalize); ATAT and AGKD-BML set their own codes' scaling below (docs/recipes.md).
  c.model.input_norm = "none"
  c.num_epochs = 100
  c.optim.boundaries = (75, 90)
  return common.apply_arg(c, arg)  # with the recipes of AGAIN, AGKD-BML, ATAT, AFA stage II


def get_config(arg: str | None = None):
  return cifar_config("cifar10", arg)
