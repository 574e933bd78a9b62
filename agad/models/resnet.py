"""Post-activation ResNets for CIFAR-size inputs (He et al. 2016; kuangliu/pytorch-cifar).

CIFAR stem: 3x3 conv (stride 1) - BN - ReLU, no max pool. Stages of BasicBlock
(ResNet-18 ``(2, 2, 2, 2)``, ResNet-34 ``(3, 4, 6, 3)``) or Bottleneck (ResNet-50
``(3, 4, 6, 3)``, expansion 4) units with widths 64/128/256/512; stages 2-4 halve the
resolution; projection shortcut = 1x1 conv + BN where the shape changes. Then global
average pooling and a linear classifier. Convs have no bias. Init: PyTorch's defaults
(kuangliu sets none): convs and the classifier U(+-1/sqrt(fan_in)).

Tap / site table for a ``[B, 32, 32, 3]`` input (e = 1 for BasicBlock, 4 for Bottleneck;
w_s = 64 * 2^(s-1)):

  stem                      [B, 32, 32, 64]             after the stem conv-BN-ReLU
  stage{s}.unit{i}.branch   [B, 32/2^(s-1), ., w_s*e]   residual branch output (after its
                                                        last BN), before the addition;
                                                        nests under child stage{s}_unit{i}
  stage{s}.unit{i}          [B, 32/2^(s-1), ., w_s*e]   unit output, after the addition
                                                        and the final ReLU (what the unit
                                                        returns); top level, not nested
  stage1 .. stage4          [B, 32/2^(s-1), ., w_s*e]   stage outputs (= the stage's last
                                                        unit site, on the same tensor)
  features                  [B, 4, 4, 512*e]            = stage4, before pooling
  embedding                 [B, 512*e]                  pooled penultimate vector

Parameter counts (10 classes, PyTorch counting: BN scale+bias, not running stats):
ResNet-18 11,173,962; ResNet-34 21,282,122; ResNet-50 23,520,842.
"""

from collections.abc import Mapping, Sequence

import flax.linen as nn

from agad.models.layers import TORCH_CONV_DEFAULT, Backbone, Unit, conv, norm_act, site


class BasicBlock(Unit):
  """conv3x3(stride)-BN-ReLU-conv3x3-BN [+ shortcut] -> ReLU; out width = features."""

  expansion = 1

  @nn.compact
  def __call__(self, x, *, train: bool, labels=None, norm_ctx: Mapping | None = None):
    n = dict(train=train, norm_ctx=norm_ctx)
    y = norm_act(self, conv(self, x, self.features, stride=self.stride, name="conv1"), "bn1", **n)
    y = norm_act(self, conv(self, y, self.features, name="conv2"), "bn2", relu=False, **n)
    y = site(self, f"{self.tap}.branch", y, train=train, labels=labels)
    return nn.relu(y + self.shortcut(x, self.features, batch_norm=True, **n))


class Bottleneck(Unit):
  """1x1-BN-ReLU, 3x3(stride)-BN-ReLU, 1x1(4x)-BN [+ shortcut] -> ReLU; out width = 4 * features."""

  expansion = 4

  @nn.compact
  def __call__(self, x, *, train: bool, labels=None, norm_ctx: Mapping | None = None):
    n = dict(train=train, norm_ctx=norm_ctx)
    out = self.features * self.expansion
    y = norm_act(self, conv(self, x, self.features, 1, name="conv1"), "bn1", **n)
    y = norm_act(self, conv(self, y, self.features, stride=self.stride, name="conv2"), "bn2", **n)
    y = norm_act(self, conv(self, y, out, 1, name="conv3"), "bn3", relu=False, **n)
    y = site(self, f"{self.tap}.branch", y, train=train, labels=labels)
    return nn.relu(y + self.shortcut(x, out, batch_norm=True, **n))


class ResNet(Backbone):
  """CIFAR ResNet: ``x [B, H, W, C] in [0, 1] -> logits [B, num_classes]`` (float32).

  ``stage_sizes``: units per stage; ``widths``: base width per stage (the stem uses
  ``widths[0]``); ``block``: :class:`BasicBlock` or :class:`Bottleneck`.
  """

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (64, 128, 256, 512)
  block: type[Unit] = BasicBlock

  # kuangliu/pytorch-cifar (MART's and FSR's ResNet-18) sets no init: PyTorch's defaults.
  conv_init = staticmethod(TORCH_CONV_DEFAULT)  # dense_init: the Backbone's 'torch'

  @nn.compact
  def __call__(self, x, *, train: bool, labels=None, norm_ctx: Mapping | None = None):
    x = conv(self, self.prepare(x), self.widths[0], name="stem_conv")
    x = norm_act(
      self,
      x,
      "stem_bn",
      train=train,
      norm_ctx=self.norm_group(x, "stem", train=train, norm_ctx=norm_ctx),
    )
    x = site(self, "stem", x, train=train, labels=labels)
    x = self.residual_stages(
      x, self.block, self.widths, train=train, labels=labels, norm_ctx=norm_ctx
    )
    return self.head(x, train=train, labels=labels)


class TinyBNNet(ResNet):
  """A 1,506-parameter ResNet for tests (10 classes, 3 channels).

  Conv(8)-BN-ReLU [``stem``] -> one BasicBlock of width 8 [``stage1.unit0.branch``,
  ``stage1.unit0`` = ``stage1`` = ``features``] -> GAP [``embedding``] -> Dense. It runs
  the real ResNet code path, so tests on it cover BN modes, plug-ins, norm routing and taps.
  """

  stage_sizes: Sequence[int] = (1,)
  widths: Sequence[int] = (8,)
