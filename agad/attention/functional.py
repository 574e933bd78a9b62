"""Attention maps from features: channel attention, CAM, Grad-CAM, ASC, attention shift.

Pure functions of arrays. Features are NHWC ``[B, H, W, C]``; maps are ``[B, H, W]``
float32 (float64 for float64 inputs under x64). Every function is ``jit``- and
``vmap``-safe (static arguments are python values) and differentiable w.r.t. the
features and, through ``head_fn``, the head's parameters, including second order
(``grad_cam`` is a VJP, so a loss on a Grad-CAM map backpropagates through the gradient:
double backprop). ``asc`` and the ``"iou"`` shift
are counts of thresholded pixels: defined everywhere, with zero gradient.

Definitions (b indexes examples, (h, w) positions, c channels, k classes):

  channel attention   M[b] = reduce_c A[b, :, :, c]      (Zagoruyko & Komodakis 2017,
                      "sq_mean" is their F_sum^2 up to 1/C)
  CAM                 M[b] = sum_c W[c, k_b] A[b, :, :, c]   (Zhou et al. 2016; AGAIN Eq. 1)
  Grad-CAM            alpha[b, c] = mean_hw d z[b, k_b] / d A[b, :, :, c]
                      M[b] = relu(sum_c alpha[b, c] A[b, :, :, c])  (Selvaraju et al. 2017,
                      Eq. 1-2; ``mean_hw`` is their 1/Z sum_ij)
  ASC                 mean_i 1[M_i > lam * max_j M_j]       (AGAIN, Yin et al. 2023, Eq. 2)

For a GAP + linear head ``z = mean_hw(A) @ W + b``, ``d z_k / d A[h, w, c] = W[c, k] / HW``,
so ``grad_cam(head, A, k) = relu(cam(A, W, k)) / (H * W)`` exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Array = Any

REDUCES = ("mean", "sum", "abs_mean", "sq_mean")
NORMALIZE = (None, "minmax", "max", "l2")
SHIFT_METRICS = ("l1", "l2", "cosine", "iou")
EPS = 1e-12


def _float(x: Array) -> Array:
  """At least float32 (bf16/f16 compute is upcast); float64 stays float64 (for x64 tests)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_features(features: Array, who: str) -> Array:
  features = jnp.asarray(features)
  if features.ndim != 4:
    raise ValueError(
      f"{who}: features must be NHWC [B, H, W, C], got shape {features.shape}; "
      "add the batch axis with features[None]"
    )
  return features


def _check_maps(maps: Array, who: str) -> Array:
  maps = _float(maps)
  if maps.ndim != 3:
    raise ValueError(
      f"{who}: maps must be [B, H, W], got shape {maps.shape}; add the batch axis with maps[None]"
    )
  return maps


def _safe_div(num: Array, den: Array, where: Array) -> Array:
  """``num / den`` where ``where`` else 0, with finite gradients on both branches."""
  den = jnp.where(where, den, 1.0)
  return jnp.where(where, num / den, 0.0)


def _safe_sqrt(x: Array) -> Array:
  """``sqrt(x)`` for ``x >= 0`` with gradient 0 (not inf/NaN) at 0."""
  pos = x > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)


def _safe_norm(maps: Array) -> Array:
  """Per-example L2 norm ``[B, H, W] -> [B]``, differentiable at 0."""
  return _safe_sqrt(jnp.sum(jnp.square(maps), axis=(1, 2)))


def normalize_maps(maps: Array, method: str | None = "minmax", *, eps: float = EPS) -> Array:
  """Per-example normalisation of maps ``[B, H, W] -> [B, H, W]`` float32.

  ``"minmax"``: ``(M - min M) / (max M - min M)`` in [0, 1], 0 where the map is constant
  (``max - min <= eps``); ``"max"``: ``M / max|M|``; ``"l2"``: ``M / ||M||_2`` (attention
  transfer's normalisation); ``None``: unchanged. A zero map stays zero for every method.
  """
  maps = _check_maps(maps, "normalize_maps")
  if method is None:
    return maps
  if method == "minmax":
    lo = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - lo
    return _safe_div(maps - lo, span, span > eps)
  if method == "max":
    top = jnp.abs(maps).max(axis=(1, 2), keepdims=True)
    return _safe_div(maps, top, top > eps)
  if method == "l2":
    norm = _safe_norm(maps)[:, None, None]
    return _safe_div(maps, norm, norm > eps)
  raise ValueError(f"normalize={method!r} is not one of {NORMALIZE}")


def channel_attention(
  features: Array, *, reduce: str = "mean", normalize: str | None = None
) -> Array:
  """Activation-based attention ``[B, H, W, C] -> [B, H, W]``, reduced over channels.

  ``reduce``: ``"mean"`` ``mean_c A``, ``"sum"`` ``sum_c A``, ``"abs_mean"``
  ``mean_c |A|``, ``"sq_mean"`` ``mean_c A^2`` (attention transfer, p = 2).
  ``normalize``: see :func:`normalize_maps`.
  """
  a = _float(_check_features(features, "channel_attention"))
  if reduce == "mean":
    m = a.mean(-1)
  elif reduce == "sum":
    m = a.sum(-1)
  elif reduce == "abs_mean":
    m = jnp.abs(a).mean(-1)
  elif reduce == "sq_mean":
    m = jnp.square(a).mean(-1)
  else:
    raise ValueError(f"reduce={reduce!r} is not one of {REDUCES}")
  return normalize_maps(m, normalize)


def _classes(classes: Array, batch: int, who: str) -> Array:
  classes = jnp.asarray(classes)
  if classes.shape != (batch,):
    raise ValueError(
      f"{who}: classes must be [B] = [{batch}] ints (one class per example), "
      f"got shape {classes.shape}"
    )
  return classes.astype(jnp.int32)


def cam(
  features: Array,
  class_weights: Array,
  classes: Array,
  *,
  relu: bool = False,
  normalize: str | None = None,
) -> Array:
  """Class activation map (Zhou et al. 2016; AGAIN Eq. 1): ``[B, H, W]``.

  ``M[b] = sum_c W[c, k_b] A[b, :, :, c]`` for features ``A`` ``[B, H, W, C]`` of a
  GAP + linear head with kernel ``class_weights`` ``W`` ``[C, K]`` (flax's
  ``params['classifier']['kernel']``) and ``classes`` ``k`` ``[B]``. No bias, no
  ReLU unless ``relu``; ``normalize``: see :func:`normalize_maps`.
  """
  a = _float(_check_features(features, "cam"))
  w = _float(class_weights)
  if w.ndim != 2 or w.shape[0] != a.shape[-1]:
    raise ValueError(
      f"cam: class_weights must be [C, K] with C = {a.shape[-1]} feature "
      f"channels, got shape {w.shape}; pass the classifier kernel, not its "
      "transpose"
    )
  k = _classes(classes, a.shape[0], "cam")
  wk = jnp.take(w, k, axis=1).T  # [B, C]
  m = jnp.einsum("bhwc,bc->bhw", a, wk)
  if relu:
    m = jax.nn.relu(m)
  return normalize_maps(m, normalize)


def grad_cam_from_grads(
  features: Array, grads: Array, *, relu: bool = True, normalize: str | None = None
) -> Array:
  """Grad-CAM from features and the gradient of each example's class logit w.r.t. them.

  ``alpha[b, c] = mean_hw grads[b, :, :, c]``, ``M[b] = relu(sum_c alpha[b, c] A[b, :, :, c])``
  (Selvaraju et al. 2017, Eq. 1-2); both ``[B, H, W, C]``, result ``[B, H, W]``.
  """
  a = _float(_check_features(features, "grad_cam"))
  g = _float(grads)
  if g.shape != a.shape:
    raise ValueError(f"grad_cam: grads shape {g.shape} differs from features {a.shape}")
  alpha = g.mean(axis=(1, 2))  # [B, C]
  m = jnp.einsum("bhwc,bc->bhw", a, alpha)
  if relu:
    m = jax.nn.relu(m)
  return normalize_maps(m, normalize)


def class_logit_grads(
  head_fn: Callable[[Array], Array], features: Array, classes: Array | None = None
) -> tuple[Array, Array, Array]:
  """``(logits [B, K], classes [B], d z[b, k_b] / d A[b] [B, H, W, C])`` in one head pass.

  The gradient of ``sum_b z[b, k_b]`` (a VJP with a one-hot cotangent), which is each
  example's gradient of its own class logit when ``head_fn`` treats examples
  independently (no batch-statistics BatchNorm). ``classes=None``: ``argmax`` of the
  logits (predicted).
  """
  a = _check_features(features, "grad_cam")
  logits, vjp = jax.vjp(head_fn, a)
  if logits.ndim != 2 or logits.shape[0] != a.shape[0]:
    raise ValueError(
      f"grad_cam: head_fn must map features {a.shape} to logits [B, K] with "
      f"B = {a.shape[0]}, got shape {logits.shape}"
    )
  if classes is None:
    k = jnp.argmax(jax.lax.stop_gradient(logits), -1).astype(jnp.int32)
  else:
    k = _classes(classes, a.shape[0], "grad_cam")
  (grads,) = vjp(jax.nn.one_hot(k, logits.shape[-1], dtype=logits.dtype))
  return logits, k, grads


def grad_cam(
  head_fn: Callable[[Array], Array],
  features: Array,
  classes: Array,
  *,
  relu: bool = True,
  normalize: str | None = None,
) -> Array:
  """Grad-CAM (Selvaraju et al. 2017) of ``head_fn`` at ``features``: ``[B, H, W]``.

  ``head_fn``: features ``[B, H, W, C]`` -> logits ``[B, K]``, any differentiable function
  (a model's remaining layers, a hand-written head, closing over its parameters);
  ``classes`` ``[B]``: the logit explained per example (None: the predicted class).
  ``M[b] = relu(sum_c mean_hw(d z[b, k_b] / d A[b, :, :, c]) * A[b, :, :, c])``, via one
  VJP of ``head_fn``.
  Differentiable w.r.t. the features and whatever ``head_fn`` closes over (second order).
  """
  _, _, grads = class_logit_grads(head_fn, features, classes)
  return grad_cam_from_grads(features, grads, relu=relu, normalize=normalize)


def upsample(maps: Array, size: int | Sequence[int], *, method: str = "bilinear") -> Array:
  """Resize maps ``[B, h, w] -> [B, H, W]`` (``size`` = ``H`` or ``(H, W)``), e.g. to overlay.

  ``jax.image.resize`` (half-pixel centres, like PyTorch's ``align_corners=False``),
  differentiable; ``method`` as there (``"bilinear"``, ``"nearest"``, ``"bicubic"``).
  """
  maps = _check_maps(maps, "upsample")
  hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
  if len(hw) != 2 or min(hw) < 1:
    raise ValueError(f"upsample: size must be H or (H, W) with positive sides, got {size!r}")
  return jax.image.resize(maps, maps.shape[:1] + hw, method=method)


def asc(maps: Array, *, lam: float = 0.5) -> Array:
  """Attribution span coverage (AGAIN, Yin et al. 2023, Eq. 2): ``[B, H, W] -> [B]``.

  ``ASC = (1/N) sum_i 1[M_i > lam * M_max]`` over the ``N = H * W`` elements of each map,
  ``M_max`` its maximum (the paper: ``lam = 0.5``, M a CAM). The inequality is strict, so
  an all-zero map has ASC 0. Piecewise constant: zero gradient.
  """
  maps = _check_maps(maps, "asc")
  top = maps.max(axis=(1, 2), keepdims=True)
  count = jnp.sum((maps > lam * top).astype(maps.dtype), axis=(1, 2))
  return count / (maps.shape[1] * maps.shape[2])  # a count over N: exact for N a power of 2


def top_mask(maps: Array, top_frac: float = 0.2) -> Array:
  """``[B, H, W]`` 0/1 float mask of each map's ``k = max(1, round(top_frac * H * W))``
  largest elements (ties broken by position, so equal maps give equal masks)."""
  maps = _check_maps(maps, "top_mask")
  if not 0.0 < top_frac <= 1.0:
    raise ValueError(f"top_frac={top_frac!r} must be in (0, 1]: the fraction of pixels kept")
  b, h, w = maps.shape
  k = max(1, int(round(top_frac * h * w)))
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(maps).reshape(b, h * w), k)
  mask = jnp.zeros((b, h * w), maps.dtype).at[jnp.arange(b)[:, None], idx].set(1.0)
  return mask.reshape(b, h, w)


def attention_shift(
  maps_clean: Array,
  maps_adv: Array,
  *,
  metric: str = "l1",
  top_frac: float = 0.2,
  normalize: str | None = "minmax",
) -> Array:
  """How far attention moves from clean to adversarial maps: ``[B, H, W] x 2 -> [B]``.

  Both maps are first normalised per example (``normalize``, default min-max to [0, 1]):
  ``"l1"`` ``mean_hw |a - b|``; ``"l2"`` ``sqrt(mean_hw (a - b)^2)`` (both in [0, 1] after
  min-max); ``"cosine"`` ``1 - <a, b> / (||a|| ||b||)`` (0 if both maps are zero, 1 if
  exactly one is); ``"iou"`` ``1 - |T_a ∩ T_b| / |T_a ∪ T_b|`` with ``T`` the top
  ``top_frac`` pixels of each map (:func:`top_mask`). Every metric is 0 for identical maps.
  """
  a = _check_maps(maps_clean, "attention_shift")
  b = _check_maps(maps_adv, "attention_shift")
  if a.shape != b.shape:
    raise ValueError(
      f"attention_shift: clean maps {a.shape} and adversarial maps {b.shape} "
      "differ; upsample one of them first"
    )
  if metric not in SHIFT_METRICS:
    raise ValueError(f"metric={metric!r} is not one of {SHIFT_METRICS}")
  a, b = normalize_maps(a, normalize), normalize_maps(b, normalize)
  if metric == "l1":
    return jnp.abs(a - b).mean(axis=(1, 2))
  if metric == "l2":
    return _safe_sqrt(jnp.square(a - b).mean(axis=(1, 2)))
  if metric == "cosine":
    na, nb = _safe_norm(a), _safe_norm(b)
    both = (na > EPS) & (nb > EPS)
    cos = _safe_div(jnp.sum(a * b, axis=(1, 2)), na * nb, both)
    none = (na <= EPS) & (nb <= EPS)
    return jnp.where(none, 0.0, 1.0 - cos)
  ta, tb = top_mask(a, top_frac), top_mask(b, top_frac)
  inter = jnp.sum(ta * tb, axis=(1, 2))
  union = jnp.sum(jnp.maximum(ta, tb), axis=(1, 2))
  return 1.0 - inter / union
