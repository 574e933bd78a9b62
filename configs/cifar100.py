"""CIFAR-100 (TFDS ArrayRecord): the CIFAR-10 recipe with 100 classes.

``wrn34_10,again+awp`` gets AGAIN's recipe (``agad.defenses.again.recipe``); its ASE heads, like
the classifier, have 100 outputs (the official code hard-codes 10).

``wrn34_10,atat`` gets ATAT's CIFAR-10 recipe (``agad.defenses.atat.recipe``): the paper uses "the
same hyper-parameters as we did on CIFAR-10" (Sec. 5). The code's cifar100/config.json
has batch 64, 7000 steps and data_path cifar10_data; its train_tsf.py:114-115 starts the
student from random init and restores the teacher's step 100000, so all 7000 steps run at
lr 0.001. Its loss is ``--config.objective.atat.variant=code_cifar100``
(docs/defenses/atat.md). Paper Table 2 (train-mode BN at test
time, no AA): clean 76.22, PGD-10 35.03, PGD-20 28.72 (AT-PGD 61.14 / 24.09).
"""

from configs import cifar10


def get_config(arg: str | None = None):
  return cifar10.cifar_config("cifar100", arg)
