"""SmallCNN, the MNIST network of TRADES (Zhang et al. 2019), and SmallCNN-BN.

Conv(32)-ReLU-Conv(32)-ReLU-pool, Conv(64)-ReLU-Conv(64)-ReLU-pool (3x3 valid convs with
bias), flatten, Dense(200)-ReLU-Dense(200)-ReLU, Dense(num_classes). TRADES puts a
Dropout(0.5) after the first Dense; it is omitted so the model stays deterministic (no
rng plumbing through attacks) — use a plug-in at ``embedding`` if it is wanted.

Init as in TRADES' ``models/small_cnn.py``: conv kernels Kaiming normal (fan-in) with zero
biases, the two hidden Dense layers PyTorch's nn.Linear default, and the classifier (kernel
and bias) zero, so the network starts at the uniform output. Without the zero classifier the
BN-free net starts with CE ~3.6 and input-gradient norms ~60, and AWP's first steps (or
MART's at lr 0.05) push it into dead ReLUs (docs/results/base_objectives.md).

Tap / site table (28x28x1 input; 32x32x3 in brackets):

  stem             [B, 26, 26, 32]  ([30, 30])   after the first conv-ReLU
  stage1.pre_pool  [B, 24, 24, 32]  ([28, 28])   after the second conv-ReLU, before pool 1
  stage1           [B, 12, 12, 32]  ([14, 14])   after the first pool
  stage2.pre_pool  [B, 8, 8, 64]    ([10, 10])   after the fourth conv-ReLU, before pool 2
  stage2           [B, 4, 4, 64]    ([5, 5])     after the second pool
  features         = stage2                      before flattening
  embedding        [B, 200]                      after the second Dense-ReLU

Parameters, 10 classes: 320 + 9,248 + 18,496 + 36,928 (convs) + 205,000 + 40,200 + 2,010
(dense) = 312,202 for 28x28x1; 427,978 for 32x32x3 (conv1 896, fc0 1600*200+200).

SmallCNN-BN (``smallcnn_bn``, not in TRADES): the same network with the model's ``norm``
(BatchNorm by default; ``functools.partial(MultiBranchBatchNorm, num_branches=K)`` for
AFA) between each conv and its ReLU, i.e. conv-BN-ReLU. The convs keep their bias (as in
SmallCNN; redundant before BN but harmless), inits, sites and zero classifier are
SmallCNN's. Parameters, 10 classes, 28x28x1: 312,202 + 2 * (32 + 32 + 64 + 64) (BN scale
and bias) = 312,586 (with K branches: 312,202 + 384 * K); running statistics live in
``batch_stats``.
"""

from collections.abc import Mapping

import flax.linen as nn

from agad.models.layers import KAIMING_FAN_IN, Backbone


class SmallCNN(Backbone):
  """``x [B, H, W, C] in [0, 1] -> logits [B, num_classes]``; ``norm`` is unused (no BN)."""

  # Plain class constants, not dataclass fields: the layout is fixed.
  stage_sizes = (2, 2)
  batch_norm = False

  @nn.compact
  def __call__(self, x, *, train: bool, labels=None, norm_ctx: Mapping | None = None):
    x = self.plain_stages(
      self.prepare(x),
      (32, 64),
      batch_norm=self.batch_norm,
      padding=0,
      init=KAIMING_FAN_IN,
      train=train,
      labels=labels,
      norm_ctx=norm_ctx,
    )
    return self.head(
      x, hidden=(200, 200), flatten=True, zero_classifier=True, train=train, labels=labels
    )


class SmallCNNBN(SmallCNN):
  """SmallCNN with conv-``norm``-ReLU: ``x [B, H, W, C] in [0, 1] -> logits [B, num_classes]``.

  Norms are children ``stage{s}_bn{i}`` called with ``train``/``norm_ctx`` (apply with
  ``mutable=['batch_stats']`` in training).
  """

  batch_norm = True
