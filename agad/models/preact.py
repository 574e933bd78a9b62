"""Pre-activation ResNets: PreActResNet-18 and Wide ResNets (He et al. 2016b; Zagoruyko &
Komodakis 2016, as in the TRADES/AWP/AGAIN code).

Stem: a bare 3x3 conv (no BN: every unit starts with its own BN-ReLU). Units:
BN-ReLU -> conv3x3(stride) -> BN-ReLU -> conv3x3, plus a shortcut that is the raw input
when the shape is kept and a bias-free 1x1 conv of the *activated* input otherwise.
After the last stage a final BN-ReLU, global average pooling and a linear classifier.
Dropout is 0 in the reference training code and omitted.

Tap / site table for a ``[B, 32, 32, 3]`` input (w_s = stage widths below):

  stem                      [B, 32, 32, stem]           after the stem conv
  stage{s}.unit{i}.branch   [B, ., ., C_in]             input of the conv branch after the
                                                        unit's BN-ReLU; masks only the
                                                        branch, not the shortcut; nests
                                                        under child stage{s}_unit{i}
  stage{s}.unit{i}          [B, 32/2^(s-1), ., w_s]     unit output (branch + shortcut, no
                                                        BN/ReLU: what the unit returns);
                                                        top level, not nested
  stage{s}                  [B, 32/2^(s-1), ., w_s]     stage outputs (no BN applied; = the
                                                        stage's last unit site)
  features                  [B, 4 or 8, ., w_last]      after the final BN-ReLU
  embedding                 [B, w_last]                 pooled penultimate vector

PreActResNet-18: stem 64, widths 64/128/256/512, ``(2, 2, 2, 2)``, features 4x4.
WRN-d-k: stem 16, widths 16k/32k/64k, ``(d-4)/6`` units per stage, features 8x8; AGAIN's
mask sits at ``stage3.unit{n-1}.branch`` (alias ``stage3.unit[-1].branch``, see
:func:`agad.models.resolve_site`) and ``features``, FSR at ``features``.

Parameter counts (10 classes): PreActResNet-18 11,172,170 (kuangliu's variant without the
final BN-ReLU has 11,171,146); WRN-34-10 46,160,474; WRN-28-10 36,479,194;
WRN-16-8 10,961,370.
"""

from collections.abc import Mapping, Sequence

import flax.linen as nn

from agad.models.layers import TORCH_CONV_DEFAULT, Backbone, Unit, conv, norm_act, site


class PreActBlock(Unit):
  """Pre-activation basic unit: ``[B, H, W, Cin] -> [B, H/stride, W/stride, features]``."""

  @nn.compact
  def __call__(self, x, *, train: bool, labels=None, norm_ctx: Mapping | None = None):
    n = dict(train=train, norm_ctx=norm_ctx)
    a = norm_act(self, x, "bn1", **n)
    shortcut = self.shortcut(x, self.features, batch_norm=False, project_from=a, **n)
    y = site(self, f"{self.tap}.branch", a, train=train, labels=labels)
    y = conv(self, y, self.features, stride=self.stride, name="conv1")
    y = conv(self, norm_act(self, y, "bn2", **n), self.features, name="conv2")
    return y + shortcut


class PreActNet(Backbone):
  """Pre-activation network body; subclasses define ``stem_width``, ``widths``, ``stage_sizes``."""

  @nn.compact
  def __call__(self, x, *, train: bool, labels=None, norm_ctx: Mapping | None = None):
    x = conv(self, self.prepare(x), self.stem_width, name="stem_conv")
    x = site(self, "stem", x, train=train, labels=labels)
    x = self.residual_stages(
      x, PreActBlock, self.widths, train=train, labels=labels, norm_ctx=norm_ctx
    )
    x = norm_act(
      self,
      x,
      "final_bn",
      train=train,
      norm_ctx=self.norm_group(x, "final", train=train, norm_ctx=norm_ctx),
    )
    return self.head(x, train=train, labels=labels)


class PreActResNet18(PreActNet):
  """PreActResNet-18 (Rice et al. / AWP variant, with the final BN-ReLU)."""

  # Plain class constants, not dataclass fields: the layout is fixed.
  stem_width = 64
  # Rice et al./AWP's preactresnet.py (kuangliu's) sets no init: PyTorch's defaults.
  conv_init = staticmethod(TORCH_CONV_DEFAULT)  # dense_init: the Backbone's 'torch'
  widths = (64, 128, 256, 512)
  stage_sizes = (2, 2, 2, 2)


class WideResNet(PreActNet):
  """WRN-``depth``-``widen_factor``; ``depth`` must be 6n + 4."""

  depth: int = 34
  widen_factor: int = 10

  stem_width = 16
  # TRADES' wideresnet.py (also AWP's and AGAIN's): convs N(0, 2 / (k * k * Cout)), the
  # classifier's weight PyTorch's default and its bias zero.
  dense_init = "torch_weight"

  @property
  def stage_sizes(self) -> Sequence[int]:
    if (self.depth - 4) % 6:
      raise ValueError(f"WRN depth must be 6n + 4, got {self.depth}")
    return ((self.depth - 4) // 6,) * 3

  @property
  def widths(self) -> Sequence[int]:
    return tuple(w * self.widen_factor for w in (16, 32, 64))
