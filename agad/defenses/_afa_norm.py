"""AFA's stage-II norm layer: two kept BN branches fused by a learnt weight generator.

Wang et al., "Adaptive Feature Alignment for Adversarial Training" (Tencent Youtu; no
official code). After stage I trained a K-branch BN network (``MultiBranchBatchNorm``,
branch k for attack strength xi_k), stage II keeps two branches, BN_0 (clean) and
BN_{K-1} (strongest), and fuses them per example (paper Eqs. 1-2):

    W0    = sigmoid(WG(x))                              Eq. 1, W1 = 1 - W0
    x_hat = W0 * BN_0(x) + (1 - W0) * BN_{K-1}(x)       Eq. 2

with ``x [B, H, W, C]`` the input of the layer's *stage* (``wg_per='stage'``, the default:
one WG per stage reading the stage's input, :class:`AFAStageHook`, run by the backbone's
``norm_hook`` and handing W0 to the stage's layers through ``norm_ctx``) or of the layer
itself (``wg_per='layer'``: one WG per BN layer, the paper's "x is the image feature" read
literally). The weight generator (paper Fig. 5) is

    WG(x) = Linear(ReLU(Linear(GAP(CBR(CBR(x))))))   CBR = Conv3x3(width, no bias)-BN-ReLU

``[B, H, W, C] -> [B, 1]`` (``wg_out="scalar"``, the paper's single W0) or ``[B, C]``
(``"channel"``, one weight per channel; an option, not in the paper). Its convs start as
the backbone's reference code inits its convs (the parent's ``conv_init``), its Linear
layers with PyTorch's nn.Linear default (the paper's framework), so W0 starts near 0.5.

BN modes. The kept branches are :class:`~agad.models.layers.BatchNorm` children named
``branch{k}`` with k the *stage-I* index (``branch0``, ``branch4``), so ``init_from`` the
stage-I run copies them by identity. ``freeze_stats=True`` (default): they always
normalise with their running statistics, in training passes too, so stage II leaves
every backbone statistic bitwise unchanged (parameters are frozen by ``init.freeze``).
The WG's own BNs are ordinary (batch statistics and updates in training passes).

Routing by ``norm_ctx`` (the backbone hands it to every norm layer):

* ``None`` -> the deployed model: W0 from the WG (what ``agad.load(...).logits_fn`` runs);
* ``{'w0': w}`` (scalar, ``[B]`` or ``[B, C]``) -> that fixed weight instead of the WG's;
* ``{'branch': k}`` with k a kept stage-I index (``-1`` allowed) -> ``BN_k(x)`` alone.

Sown into ``aux`` (per layer, nested under the layer's path): ``afa_w0`` ``[B, 1]`` or
``[B, C]`` and ``afa_logit`` (the WG's pre-sigmoid output, for a stable BCE).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from agad.models.layers import TORCH_CONV_DEFAULT, BatchNorm, torch_linear_uniform

WG_OUTS = ("scalar", "channel")
W0_NAME = "afa_w0"
LOGIT_NAME = "afa_logit"


def kept_branches(num_branches: int, keep: Sequence[int]) -> tuple[int, int]:
  """``keep`` (two stage-I indices, negatives from the end) -> non-negative ``(lo, hi)``.

  The first index is the branch W0 weights (the paper: BN_0), the second BN_{K-1}.
  """
  if len(keep) != 2:
    raise ValueError(
      f"AFA keep={tuple(keep)!r} must name two branches, e.g. (0, -1) = BN_0 and BN_K-1"
    )
  out = []
  for k in keep:
    k = int(k)
    if not -num_branches <= k < num_branches:
      raise ValueError(
        f"AFA keep index {k} is outside the {num_branches} stage-I branches; "
        f"use an index in [-{num_branches}, {num_branches - 1}]"
      )
    out.append(k % num_branches)
  if out[0] == out[1]:
    raise ValueError(
      f"AFA keep={tuple(keep)!r} names branch {out[0]} twice; keep two different branches"
    )
  return out[0], out[1]


class WeightGenerator(nn.Module):
  """Paper Fig. 5: ``x [B, H, W, C] -> logit [B, out]`` (float32; W0 = sigmoid(logit)).

  2 x (Conv3x3(width, no bias)-BN-ReLU) -> global average pool -> Linear(width)-ReLU ->
  Linear(out). ``conv_init``: the backbone's conv init (None: PyTorch's default).
  """

  width: int = 16
  out: int = 1
  conv_init: Callable | None = None

  @nn.compact
  def __call__(self, x, *, train: bool):
    if x.ndim != 4:
      raise ValueError(
        f"the AFA weight generator reads [B, H, W, C] features, got shape {x.shape}; "
        "AFANorm can only replace the norm layers of convolutional stages"
      )
    h = x
    for i in range(2):
      h = nn.Conv(
        self.width,
        (3, 3),
        padding=1,
        use_bias=False,
        dtype=x.dtype,
        kernel_init=self.conv_init or TORCH_CONV_DEFAULT,
        name=f"conv{i}",
      )(h)
      h = nn.relu(BatchNorm(name=f"bn{i}")(h, train=train))
    h = h.astype(jnp.float32).mean(axis=(1, 2))
    init = torch_linear_uniform(h.shape[-1])
    h = nn.relu(nn.Dense(self.width, kernel_init=init, bias_init=init, name="fc0")(h))
    init = torch_linear_uniform(self.width)
    return nn.Dense(self.out, kernel_init=init, bias_init=init, name="fc1")(h).astype(jnp.float32)


class AFANorm(nn.Module):
  """Stage-II AFA norm: ``(x [B, ..., C], *, train, norm_ctx) -> [B, ..., C]`` (see module doc).

  Attributes:
    num_branches: K of the stage-I run (5 in the paper).
    keep: the two stage-I branches kept, ``(0, -1)`` = BN_0 and BN_{K-1} (paper Fig. 4b).
    wg_width: channels of the WG's convs and hidden Linear (not in the paper; 16).
    wg_out: ``"scalar"`` (one W0 per example, paper Eq. 1) or ``"channel"`` (per channel).
    freeze_stats: kept branches always use their running statistics (stage II freezes them).
  """

  num_branches: int = 5
  keep: tuple = (0, -1)
  wg_width: int = 16
  wg_out: str = "scalar"
  freeze_stats: bool = True
  own_wg: bool = True  # False: W0 comes from the stage's AFAStageHook (norm_ctx['w0'])

  @nn.compact
  def __call__(self, x, *, train: bool, norm_ctx: Mapping | None = None):
    if self.wg_out not in WG_OUTS:
      raise ValueError(f"AFA wg_out={self.wg_out!r} is not one of {WG_OUTS}")
    lo, hi = kept_branches(self.num_branches, self.keep)
    ctx = dict(norm_ctx or {})
    unknown = set(ctx) - {"w0", "branch"}
    if unknown:
      raise ValueError(
        f"AFANorm norm_ctx keys {sorted(unknown)} are unknown: pass None (the weight "
        "generator), {'w0': w} or {'branch': k}"
      )
    bn_train = train and not self.freeze_stats
    branches = {lo: BatchNorm(name=f"branch{lo}"), hi: BatchNorm(name=f"branch{hi}")}
    init = self.is_initializing()
    w0 = None
    if not self.own_wg and "w0" not in ctx and "branch" not in ctx:
      raise ValueError(
        "this AFANorm has no weight generator of its own (wg_per='stage'): the "
        "backbone's norm hook (AFAStageHook) must hand it norm_ctx['w0']; build the "
        "model with agad.defenses.build_model, or pass {'w0': w} / {'branch': k}"
      )
    if self.own_wg and "w0" not in ctx and ("branch" not in ctx or init):
      conv_init = getattr(self.parent, "conv_init", None)
      logit = WeightGenerator(
        self.wg_width, 1 if self.wg_out == "scalar" else x.shape[-1], conv_init, name="wg"
      )(x, train=train)
      w0 = jax.nn.sigmoid(logit)  # [B, 1] or [B, C]
      self.sow("aux", W0_NAME, w0)
      self.sow("aux", LOGIT_NAME, logit)
    if "branch" in ctx:
      k = int(ctx["branch"]) % self.num_branches
      if k not in branches:
        raise ValueError(
          f"AFANorm keeps branches {lo} and {hi} only, norm_ctx asked for branch "
          f"{ctx['branch']}; route to one of them or use the stage-I model"
        )
      if init:
        for bn in branches.values():
          bn(x, train=bn_train)
      return branches[k](x, train=bn_train)
    if "w0" in ctx:
      w0 = jnp.asarray(ctx["w0"], jnp.float32)
      if w0.ndim > 2 or (w0.ndim >= 1 and w0.shape[0] != x.shape[0]):
        raise ValueError(
          f"norm_ctx['w0'] has shape {w0.shape}; pass a scalar, [B] or [B, C] with B = {x.shape[0]}"
        )
      w0 = jnp.broadcast_to(w0, (x.shape[0],)) if w0.ndim == 0 else w0
      w0 = w0[:, None] if w0.ndim == 1 else w0
    w = w0.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + w0.shape[-1:]).astype(jnp.float32)
    y0 = branches[lo](x, train=bn_train).astype(jnp.float32)
    y1 = branches[hi](x, train=bn_train).astype(jnp.float32)
    return (w * y0 + (1.0 - w) * y1).astype(x.dtype)


class AFAStageHook(nn.Module):
  """One weight generator per norm group (``wg_per='stage'``), as the backbone's
  ``norm_hook``: ``(x [B, H, W, C], *, train, norm_ctx) -> norm_ctx`` for the group's
  :class:`AFANorm` layers (built with ``own_wg=False``).

  ``norm_ctx=None`` -> ``{'w0': sigmoid(WG(x)) [B]}`` (W0 sown as ``afa_w0`` ``[B, 1]``,
  the logit as ``afa_logit``); a ``{'w0': ...}`` or ``{'branch': k}`` override is passed
  through unchanged (the WG still builds its parameters at init).
  """

  wg_width: int = 16

  @nn.compact
  def __call__(self, x, *, train: bool, norm_ctx: Mapping | None = None):
    ctx = dict(norm_ctx or {})
    override = "w0" in ctx or "branch" in ctx
    if override and not self.is_initializing():
      return norm_ctx
    conv_init = getattr(self.parent, "conv_init", None)
    logit = WeightGenerator(self.wg_width, 1, conv_init, name="wg")(x, train=train)
    w0 = jax.nn.sigmoid(logit)  # [B, 1]
    self.sow("aux", W0_NAME, w0)
    self.sow("aux", LOGIT_NAME, logit)
    return norm_ctx if override else {**ctx, "w0": w0[:, 0]}


def sown(aux: Any, name: str = W0_NAME) -> list[jax.Array]:
  """Every array sown under ``name`` anywhere in an ``aux`` collection, sorted by path."""
  found = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(aux)[0]:
    keys = [getattr(p, "key", None) for p in path]
    if name in keys:
      found.append((tuple(str(k) for k in keys), leaf))
  return [leaf for _, leaf in sorted(found, key=lambda t: t[0])]


def per_example_mean(arrays: Sequence[jax.Array]) -> jax.Array:
  """Mean over layers and channels of sown ``[B, n]`` arrays -> ``[B]``."""
  if not arrays:
    raise ValueError(
      "no AFA weights were sown: the model has no AFANorm layer (is the objective "
      "afa_stage2, and was the pass run with norm_ctx=None?)"
    )
  total = sum(jnp.sum(a.astype(jnp.float32), axis=-1) for a in arrays)
  return total / sum(a.shape[-1] for a in arrays)


def w0_per_example(out: Any) -> jax.Array:
  """Mean fusion weight W0 over layers (and channels) per example ``[B]`` of a pass
  (``out``: a ``base.ModelOutput``, whose ``aux`` holds the sown weights)."""
  return per_example_mean(sown(out.aux, W0_NAME))
