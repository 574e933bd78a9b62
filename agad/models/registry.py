"""Backbones by name: ``build_model('wrn34_10', num_classes=10, mean=..., std=...)``."""

import functools
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from agad.models.layers import BatchNorm, check_input_norm
from agad.models.preact import PreActResNet18, WideResNet
from agad.models.resnet import Bottleneck, ResNet, TinyBNNet
from agad.models.smallcnn import SmallCNN, SmallCNNBN
from agad.models.vgg import VGG16

_P = functools.partial
_BUILDERS: dict[str, Callable[..., nn.Module]] = {
  "smallcnn": SmallCNN,
  "smallcnn_bn": SmallCNNBN,
  "resnet18": _P(ResNet, stage_sizes=(2, 2, 2, 2)),
  "resnet34": _P(ResNet, stage_sizes=(3, 4, 6, 3)),
  "resnet50": _P(ResNet, stage_sizes=(3, 4, 6, 3), block=Bottleneck),
  "preact_resnet18": PreActResNet18,
  "wrn34_10": _P(WideResNet, depth=34, widen_factor=10),
  "wrn28_10": _P(WideResNet, depth=28, widen_factor=10),
  "wrn16_8": _P(WideResNet, depth=16, widen_factor=8),
  "vgg16": VGG16,
  "tiny_bn": TinyBNNet,
}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(
  name: str,
  *,
  num_classes: int,
  mean: Sequence[float],
  std: Sequence[float],
  dtype=jnp.float32,
  plugins: Mapping[str, Callable[[], nn.Module]] | None = None,
  norm: Callable[..., nn.Module] | None = None,
  input_norm: str = "dataset",
  norm_hook: Callable[[], nn.Module] | None = None,
) -> nn.Module:
  """The backbone ``name`` (one of MODEL_NAMES); ``norm=None`` means :class:`BatchNorm`.

  ``norm_hook``: the per-group ``norm_ctx`` hook (:class:`~agad.models.layers.Backbone`).
  ``input_norm``: one of ``INPUT_NORMS`` (see :class:`Backbone`): ``'dataset'`` applies
  ``mean``/``std``, ``'per_image'`` standardises each image, ``'none'`` keeps the pixels.
  ``plugins`` keys are used as given: resolve aliases and catch misspelt sites first with
  :func:`agad.models.resolve_plugins`.
  """
  if name not in _BUILDERS:
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
  check_input_norm(input_norm)
  # Tuples of floats keep the module hashable whatever sequence type the config used.
  return _BUILDERS[name](
    num_classes=num_classes,
    mean=tuple(map(float, mean)),
    std=tuple(map(float, std)),
    dtype=dtype,
    plugins=plugins,
    norm=norm or BatchNorm,
    input_norm=input_norm,
    norm_hook=norm_hook,
  )
