"""Attention maps of agad backbones at any site (nested sites and unit outputs included).

A linen backbone cannot be cut at a site, so the split is emulated with the site's
perturbation (``agad.models.layers.site``): the model is applied with a *partial*
``'perturbations'`` tree holding zeros ``delta`` at the target site only, and

    d z / d A_site = d z / d delta     (the site returns A + delta)

Grad-CAM at a site is therefore one forward pass (which also returns the site's value
``A`` as a tap and the logits ``z``) plus one VJP from a one-hot cotangent on each
example's class logit (:func:`tap_grad`): no second trunk pass, and only the layers
after the site are backpropagated (``delta`` is the only differentiated input). The
result stays differentiable w.r.t. ``variables`` (a student's Grad-CAM loss trains its
weights by double backprop).

BatchNorm modes are those of :func:`agad.objectives.base.forward`: ``"eval"`` (running
averages; every example's map depends on that example only, so batching does not change
it), ``"batch"`` / ``"train"`` (batch statistics; updated statistics are discarded here).
With batch statistics *after* the site, the one-hot VJP mixes examples (each logit
depends on the whole batch); it is per-example at ``features`` and ``embedding`` of
every agad backbone (no BN after them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from agad.attention import functional as maps_lib
from agad.models import sites as sites_lib
from agad.objectives import base

Array = Any
PyTree = Any

KINDS = ("grad_cam", "cam", "channel_mean", "channel_sum", "channel_abs_mean", "channel_sq_mean")
DEFAULT_KINDS = ("grad_cam", "cam", "channel_mean")
_SKIP = ("params", "perturbations", "intermediates")


class TapGrad(NamedTuple):
  """One pass of :func:`tap_grad`."""

  logits: Array  # [B, K] float32
  classes: Array  # [B] int32, the class explained per example
  features: Array  # [B, H, W, C] the site's value A
  grads: Array  # [B, H, W, C] d z[b, classes[b]] / d A


def _split(variables: PyTree) -> tuple[PyTree, dict]:
  if "params" not in variables:
    raise ValueError(
      f"variables must hold 'params' (and 'batch_stats' if the model has "
      f"BatchNorm), got collections {sorted(variables)}"
    )
  state = {k: v for k, v in variables.items() if k not in _SKIP}
  return variables["params"], state


def _images(images: Array) -> Array:
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4:
    raise ValueError(
      f"images must be [B, H, W, C] in [0, 1], got shape {images.shape}; add "
      "the batch axis with images[None]"
    )
  return images


def resolve(model: nn.Module, site: str, input_shape: Sequence[int]) -> str:
  """``site`` resolved (unit aliases such as ``stage3.unit[-1]``), ValueError if no site."""
  return sites_lib.resolve_site(model, site, tuple(input_shape))


def _site_entry(
  model: nn.Module, variables: PyTree, images: Array, site: str
) -> tuple[tuple[str, ...], jax.ShapeDtypeStruct]:
  """The path of ``site`` in the model's collections and its value's shape/dtype (abstract)."""
  params, state = _split(variables)

  def inter(p, s, x):
    _, upd = model.apply({"params": p, **s}, x, train=False, mutable=["intermediates"])
    return upd["intermediates"]

  spec = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
  tree = jax.eval_shape(inter, *jax.tree.map(spec, (params, state, images)))
  for path, value in traverse_util.flatten_dict(tree).items():
    if path[-1] == site:
      return path[:-1] + (site,), (value[-1] if isinstance(value, tuple) else value)
  raise ValueError(
    f"site {site!r} was not reached by the forward pass; sites: "
    f"{', '.join(sites_lib.site_names(model, images.shape[1:]))}"
  )


def _perturbation(path: tuple[str, ...], delta: Array) -> dict:
  return traverse_util.unflatten_dict({path: delta})


def tap_grad(
  model: nn.Module,
  variables: PyTree,
  images: Array,
  classes: Array | None = None,
  *,
  site: str = "features",
  mode: str = "eval",
  labels: Array | None = None,
  norm_ctx: Any = None,
  rng: Array | None = None,
) -> TapGrad:
  """Logits, the site's value ``A`` and ``d z[b, k_b] / d A`` in one forward pass + one VJP.

  Args:
    model, variables: an agad backbone and ``{'params', 'batch_stats'?}`` (extra
      'perturbations'/'intermediates' collections are ignored).
    images: ``[B, H, W, C]`` in [0, 1].
    classes: ``[B]`` ints, or None for the predicted class ``argmax z[b]``.
    site: a site name or unit alias (``stage3.unit[-1].branch``).
    mode: BN mode of :func:`agad.objectives.base.forward`; labels/norm_ctx/rng: passed on.
  Returns:
    :class:`TapGrad`; ``grads`` is the gradient of ``sum_b z[b, k_b]`` w.r.t. the
    site's perturbation, i.e. w.r.t. ``A`` for the layers after the site.
  """
  images = _images(images)
  site = resolve(model, site, images.shape[1:])
  params, state = _split(variables)
  path, spec = _site_entry(model, variables, images, site)

  def run(delta):
    out = base.forward(
      model,
      params,
      {**state, "perturbations": _perturbation(path, delta)},
      images,
      mode=mode,
      labels=labels,
      norm_ctx=norm_ctx,
      taps=(site,),
      rng=rng,
    )
    return out.logits, out.taps[site]

  logits, vjp, features = jax.vjp(run, jnp.zeros(spec.shape, spec.dtype), has_aux=True)
  if classes is None:
    k = jnp.argmax(jax.lax.stop_gradient(logits), -1).astype(jnp.int32)
  else:
    k = maps_lib._classes(classes, images.shape[0], "tap_grad")
  (grads,) = vjp(jax.nn.one_hot(k, logits.shape[-1], dtype=logits.dtype))
  return TapGrad(logits, k, features, grads)


def site_head(
  model: nn.Module,
  variables: PyTree,
  images: Array,
  *,
  site: str = "features",
  mode: str = "eval",
  labels: Array | None = None,
  norm_ctx: Any = None,
):
  """``(A0, head_fn)``: the site's value on ``images`` and the rest of the model after it.

  ``head_fn(a) -> logits [B, K]`` runs the model with the site perturbed by
  ``a - stop_gradient(A0)``, so ``head_fn(A0)`` are the model's logits and
  ``d head_fn / d a`` is the gradient through the layers after the site; it recomputes
  the trunk on every call (use :func:`tap_grad` for a single pass). For
  :func:`agad.attention.grad_cam` with any backbone.
  """
  images = _images(images)
  site = resolve(model, site, images.shape[1:])
  params, state = _split(variables)
  path, _ = _site_entry(model, variables, images, site)
  a0 = base.forward(
    model, params, state, images, mode=mode, labels=labels, norm_ctx=norm_ctx, taps=(site,)
  ).taps[site]

  def head_fn(a):
    delta = a - jax.lax.stop_gradient(a0)
    return base.forward(
      model,
      params,
      {**state, "perturbations": _perturbation(path, delta)},
      images,
      mode=mode,
      labels=labels,
      norm_ctx=norm_ctx,
    ).logits

  return a0, head_fn


def cam_weights(
  model: nn.Module, variables: PyTree, input_shape: Sequence[int], *, site: str = "features"
) -> Array:
  """The classifier kernel ``W [C, K]`` if ``site`` is followed by GAP + a linear classifier.

  True for ``features`` of the residual backbones (ResNet, PreAct, WRN, TinyBNNet): GAP
  -> ``embedding`` -> ``classifier``, without hidden layers or an ``embedding`` plug-in.
  ValueError otherwise (SmallCNN flattens, VGG has hidden layers, other sites have
  layers after them): use Grad-CAM, which works at every site.
  """
  shape = tuple(int(d) for d in input_shape)
  site = resolve(model, site, shape)
  params, _ = _split(variables)
  name = type(model).__name__
  why = None
  plugins = getattr(model, "plugins", None) or {}
  if site != "features":
    why = f"site {site!r} is not 'features' (layers follow it before the pooling)"
  elif "classifier" not in params or "kernel" not in params["classifier"]:
    why = "the model has no 'classifier' Dense layer"
  elif any(k.startswith("fc") for k in params):
    why = (
      f"hidden Dense layers ({', '.join(sorted(k for k in params if k.startswith('fc')))}) "
      "sit between the pooling and the classifier"
    )
  elif "embedding" in plugins:
    why = "a plug-in at 'embedding' sits between the pooling and the classifier"
  else:
    path, feat = _site_entry(model, variables, jnp.zeros((1,) + shape, jnp.float32), "features")
    _, emb = _site_entry(model, variables, jnp.zeros((1,) + shape, jnp.float32), "embedding")
    w = params["classifier"]["kernel"]
    c = feat.shape[-1]
    if emb.shape != (1, c) or w.shape[0] != c:
      why = (
        f"features {feat.shape[1:]} are not globally average-pooled into the "
        f"classifier (embedding {emb.shape[1:]}, classifier kernel {w.shape})"
      )
  if why:
    raise ValueError(
      f"cam needs a site followed by GAP + a linear classifier, but in "
      f"{name} {why}; use kind 'grad_cam' (any site) instead"
    )
  return params["classifier"]["kernel"]


def supports_cam(
  model: nn.Module, variables: PyTree, input_shape: Sequence[int], *, site: str = "features"
) -> bool:
  """Whether :func:`cam_weights` (and so kind ``"cam"``) applies at ``site``."""
  try:
    cam_weights(model, variables, input_shape, site=site)
  except ValueError:
    return False
  return True


def _check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
  kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
  bad = [k for k in kinds if k not in KINDS]
  if bad or not kinds:
    raise ValueError(f"kinds {bad or kinds!r}: each must be one of {KINDS}")
  return kinds


def maps(
  model: nn.Module,
  variables: PyTree,
  images: Array,
  classes: Array | None = None,
  *,
  site: str = "features",
  kinds: Sequence[str] = DEFAULT_KINDS,
  mode: str = "eval",
  normalize: str | None = None,
) -> dict[str, Array]:
  """Attention maps of ``model`` at ``site``: ``{kind: [B, h, w] float32}``.

  Args:
    model, variables: any agad backbone and its ``{'params', 'batch_stats'?}``.
    images: ``[B, H, W, C]`` in [0, 1].
    classes: ``[B]`` the class explained per example; None: predicted (argmax).
    site: any site or unit alias (``features``, ``stage2.pre_pool``, ``stage3.unit[-1]``,
      ``stage3.unit4.branch``); ``h, w`` are that site's.
    kinds: from ``KINDS``: ``"grad_cam"`` (relu'd, :func:`agad.attention.grad_cam`
      via :func:`tap_grad`), ``"cam"`` (:func:`agad.attention.cam` with the classifier
      kernel; ValueError where the site is not followed by GAP + linear, see
      :func:`cam_weights`), ``"channel_<reduce>"`` (:func:`agad.attention.channel_attention`).
    mode: BN mode (module docstring): eval-mode maps do not depend on the batch.
    normalize: applied to every map (:func:`agad.attention.normalize_maps`).
  """
  return maps_and_logits(
    model, variables, images, classes, site=site, kinds=kinds, mode=mode, normalize=normalize
  )[0]


def maps_and_logits(
  model: nn.Module,
  variables: PyTree,
  images: Array,
  classes: Array | None = None,
  *,
  site: str = "features",
  kinds: Sequence[str] = DEFAULT_KINDS,
  mode: str = "eval",
  normalize: str | None = None,
) -> tuple[dict[str, Array], Array]:
  """:func:`maps` and the logits ``[B, K]`` of the same forward pass."""
  kinds = _check_kinds(kinds)
  images = _images(images)
  site = resolve(model, site, images.shape[1:])
  w = cam_weights(model, variables, images.shape[1:], site=site) if "cam" in kinds else None
  if "grad_cam" in kinds:
    tg = tap_grad(model, variables, images, classes, site=site, mode=mode)
    features, k, logits = tg.features, tg.classes, tg.logits
  else:
    params, state = _split(variables)
    out = base.forward(model, params, state, images, mode=mode, taps=(site,))
    features, logits = out.taps[site], out.logits
    k = (
      jnp.argmax(logits, -1).astype(jnp.int32)
      if classes is None
      else maps_lib._classes(classes, images.shape[0], "maps")
    )
  result = {}
  for kind in kinds:
    if kind == "grad_cam":
      m = maps_lib.grad_cam_from_grads(features, tg.grads, relu=True)
    elif kind == "cam":
      m = maps_lib.cam(features, w, k)
    else:
      m = maps_lib.channel_attention(features, reduce=kind[len("channel_") :])
    result[kind] = maps_lib.normalize_maps(m, normalize)
  return result, logits
