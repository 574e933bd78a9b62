"""Attention maps for any agad backbone and site, differentiable end to end.

Pure functions of features (``functional.py``): :func:`channel_attention`, :func:`cam`,
:func:`grad_cam`, :func:`normalize_maps`, :func:`upsample`, :func:`asc` (AGAIN Eq. 2),
:func:`attention_shift`. On models (``model.py``): :func:`maps` at any site,
:func:`tap_grad` (logits, site value and its class-logit gradient in one pass),
:func:`site_head` (the model after a site as a ``head_fn``), :func:`cam_weights`.
Clean-vs-adversarial studies, statistics and figures: ``agad.attention.study`` (not
imported here; it needs matplotlib only for its figures).

Bottom layer: imports agad.models, agad.objectives.base and agad.attacks only.
"""

from agad.attention.functional import (
  NORMALIZE,
  REDUCES,
  SHIFT_METRICS,
  asc,
  attention_shift,
  cam,
  channel_attention,
  class_logit_grads,
  grad_cam,
  grad_cam_from_grads,
  normalize_maps,
  top_mask,
  upsample,
)
from agad.attention.model import (
  DEFAULT_KINDS,
  KINDS,
  TapGrad,
  cam_weights,
  maps,
  maps_and_logits,
  site_head,
  supports_cam,
  tap_grad,
)

__all__ = [
  "DEFAULT_KINDS",
  "KINDS",
  "NORMALIZE",
  "REDUCES",
  "SHIFT_METRICS",
  "TapGrad",
  "asc",
  "attention_shift",
  "cam",
  "cam_weights",
  "channel_attention",
  "class_logit_grads",
  "grad_cam",
  "grad_cam_from_grads",
  "maps",
  "maps_and_logits",
  "normalize_maps",
  "site_head",
  "supports_cam",
  "tap_grad",
  "top_mask",
  "upsample",
]
