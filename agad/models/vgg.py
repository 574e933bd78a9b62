"""VGG16 with BatchNorm for CIFAR-size inputs, with FSR's head (vgg_fsr).

Five stages of conv3x3(bias)-BN-ReLU layers, ``(2, 2, 3, 3, 3)`` with widths
64/128/256/512/512, each closed by a 2x2 max pool; global average pooling, then
Dense(512)-ReLU-Dense(512)-ReLU-Dense(num_classes) (no dropout).

Tap / site table for a ``[B, 32, 32, 3]`` input:

  stem               [B, 32, 32, 64]    after the first conv-BN-ReLU
  stage{s}.pre_pool  [B, 32/2^(s-1), ., w_s]   after stage s's last conv-BN-ReLU, before
                                        its pool (w_s = 64/128/256/512/512)
  stage1..3          [B, 16, 16, 64], [B, 8, 8, 128], [B, 4, 4, 256]   after pools 1-3
  stage4             [B, 4, 4, 512]     BEFORE pool 4: FSR's placement (a plug-in here
                                        feeds the pool and everything after it); it
                                        directly follows stage4.pre_pool on the same
                                        tensor (a plug-in there feeds stage4's)
  stage5             [B, 1, 1, 512]     after pool 5
  features           [B, 1, 1, 512]     = stage5; for spatial attention use stage4
  embedding          [B, 512]           after the second Dense-ReLU

Parameters, 10 classes: 14,723,136 in conv/BN + 530,442 in the head = 15,253,578.
"""

from collections.abc import Mapping

import flax.linen as nn

from agad.models.layers import Backbone


class VGG16(Backbone):
  """``x [B, H, W, C] in [0, 1] -> logits [B, num_classes]`` (float32)."""

  stage_sizes = (2, 2, 3, 3, 3)
  # vgg_fsr's _initialize_weights (torchvision's): convs Kaiming-normal fan_out with zero
  # bias (the Backbone default), Dense kernels N(0, 0.01^2) with zero bias.
  dense_init = "normal_0.01"

  @nn.compact
  def __call__(self, x, *, train: bool, labels=None, norm_ctx: Mapping | None = None):
    x = self.plain_stages(
      self.prepare(x),
      (64, 128, 256, 512, 512),
      batch_norm=True,
      tap_before_pool=4,
      train=train,
      labels=labels,
      norm_ctx=norm_ctx,
    )
    return self.head(x, hidden=(512, 512), train=train, labels=labels)
