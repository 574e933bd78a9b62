"""Flax linen backbones with named feature taps and plug-in sites (see layers.py)."""

from agad.models.layers import (
  INPUT_NORMS,
  Backbone,
  BatchNorm,
  MultiBranchBatchNorm,
  Unit,
  find_tap,
  max_pool_2x2,
  normalize,
  per_image_normalize,
  site,
)
from agad.models.preact import PreActBlock, PreActResNet18, WideResNet
from agad.models.registry import MODEL_NAMES, build_model
from agad.models.resnet import BasicBlock, Bottleneck, ResNet, TinyBNNet
from agad.models.sites import resolve_plugins, resolve_site, site_names
from agad.models.smallcnn import SmallCNN, SmallCNNBN
from agad.models.vgg import VGG16

__all__ = [
  "INPUT_NORMS",
  "MODEL_NAMES",
  "VGG16",
  "Backbone",
  "BasicBlock",
  "BatchNorm",
  "Bottleneck",
  "MultiBranchBatchNorm",
  "PreActBlock",
  "PreActResNet18",
  "ResNet",
  "SmallCNN",
  "SmallCNNBN",
  "TinyBNNet",
  "Unit",
  "WideResNet",
  "build_model",
  "find_tap",
  "max_pool_2x2",
  "normalize",
  "per_image_normalize",
  "resolve_plugins",
  "resolve_site",
  "site",
  "site_names",
]
