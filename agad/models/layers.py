"""Building blocks shared by every agad backbone.

Conventions: activations are NHWC; inputs are pixels in [0, 1] and the per-dataset
mean/std normalisation runs inside the model; parameters and BatchNorm statistics are
float32 while convolutions and dense layers compute in the model's ``dtype``; logits are
always float32.

Sites. Every named point of a backbone goes through :func:`site`, which (1) runs the
plug-in registered for that name, if any, (2) sows the value into the
``'intermediates'`` collection and (3) routes it through ``perturb`` so that
``jax.grad`` with respect to the ``'perturbations'`` collection is the gradient at that
tap. Sites inside a residual unit live in the unit's child module, so their entries nest
under it (``tree['stage3_unit4']['stage3.unit4.branch']``); :func:`find_tap` looks a site
up at any depth. ``init`` also returns the zero ``'perturbations'`` collection: keep only
``params``/``batch_stats`` in training state and pass perturbations when a tap gradient
is wanted. The tree may be partial: a site without an entry is left alone, so
``{'perturbations': {'features': d}}`` (or ``{'stage3_unit1': {'stage3.unit1.branch': d}}``
for a nested site) perturbs that site only, and no collection at all is a no-op.

Plug-ins. ``plugins`` maps a site name to a zero-argument factory returning a fresh
linen module, called as ``plugin(features, *, train, labels) -> features`` (same shape);
it may ``sow('aux', ...)`` auxiliary logits. A plain dict is accepted and frozen into a
``FrozenDict`` on construction: linen hashes module attributes (``jax.jit`` with a static
model, lifted transforms) and a dict is unhashable.

Norm factories. ``norm(name=...)`` returns a module called as
``module(x, *, train, norm_ctx)``: :class:`BatchNorm` (default) or
``functools.partial(MultiBranchBatchNorm, num_branches=K)``. ``train=True`` normalises
with batch statistics and updates ``batch_stats`` (apply with
``mutable=['batch_stats']``); ``train=False`` uses the running averages.

Norm hooks. ``norm_hook`` (optional) is a zero-argument factory of a module called as
``hook(x, *, train, norm_ctx) -> norm_ctx`` once per *norm group* on the group's input:
every stage (``stage{s}``, its units' shortcuts included), the stem's norm (``stem``,
ResNet) and the final norm (``final``, pre-activation nets). What it returns is the
``norm_ctx`` of that group's norm layers; it is built as child ``norm_hook_<group>`` and
may ``sow('aux', ...)``. AFA's stage II computes one fusion weight per stage with it.
"""

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import FrozenDict

Array = Any

# PyTorch's kaiming_normal_(mode='fan_out') as used by the reference ResNet/WRN/VGG code;
# 'normal' is untruncated, like PyTorch's.
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# TRADES' SmallCNN uses kaiming_normal_ with the default fan_in mode: it has no BN, so the
# init scale sets the activation scale.
KAIMING_FAN_IN = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# PyTorch's nn.Conv2d default (kaiming_uniform_ with a = sqrt(5)): U(+-1/sqrt(fan_in)),
# fan_in = kh * kw * Cin; kuangliu's ResNet/PreActResNet (MART, AWP, FSR code) keep it.
TORCH_CONV_DEFAULT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# How Dense layers start, per reference code (``Backbone.dense_init``):
#   'torch'        PyTorch's nn.Linear default, kernel and bias U(+-1/sqrt(fan_in)) (kuangliu)
#   'torch_weight' that kernel, zero bias (TRADES/AWP/AGAIN wideresnet.py)
#   'normal_0.01'  kernel N(0, 0.01^2), zero bias (torchvision VGG; FSR's vgg_fsr)
DENSE_INITS = ("torch", "torch_weight", "normal_0.01")


def torch_linear_uniform(fan_in: int) -> Callable:
  """PyTorch's nn.Linear default init for kernel and bias alike: ``U(+-1/sqrt(fan_in))``.

  (kaiming_uniform_ with a = sqrt(5) on the weight reduces to this bound.)
  """
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def normalize(x: Array, mean: Sequence[float], std: Sequence[float]) -> Array:
  """``(x - mean) / std`` over the channel axis; x ``[B, H, W, C]``, mean/std ``[C]`` or ``[1]``."""
  return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


# Backbone.input_norm values: how prepare() normalises the [0, 1] pixels.
INPUT_NORMS = ("dataset", "per_image", "none")
# tf.image.per_image_standardization floors the std at 1/sqrt(N) (N = H*W*C values) on the
# 0-255 pixels ATAT's code feeds it; on agad's [0, 1] pixels that floor is 1/(255 sqrt(N)).
PER_IMAGE_PIXEL_SCALE = 255.0


def per_image_normalize(x: Array) -> Array:
  """``tf.image.per_image_standardization`` on 0-255 pixels, for [0, 1] pixels: ``[B, H, W, C]``.

  Each image is standardised over all its ``N = H*W*C`` values together (one mean and one
  std per image, not per channel): ``(x - mean) / max(std, 1 / (255 sqrt(N)))`` with the
  biased std. The TF op floors the std at ``1/sqrt(N)`` in the units it is fed; ATAT's
  code feeds 0-255 pixels, so the floor in [0, 1] units is divided by 255, and the result
  equals the TF op on ``255 x``. A constant image maps to 0 with a finite gradient.
  """
  n = x.shape[1] * x.shape[2] * x.shape[3]
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  var = jnp.square(x - mean).mean(axis=(1, 2, 3), keepdims=True)
  floor = 1.0 / (PER_IMAGE_PIXEL_SCALE * math.sqrt(n))
  return (x - mean) * jax.lax.rsqrt(jnp.maximum(var, floor * floor))


def check_input_norm(input_norm: str) -> str:
  """``input_norm`` if it is one of ``INPUT_NORMS``, else ValueError listing them."""
  if input_norm not in INPUT_NORMS:
    raise ValueError(
      f'input_norm {input_norm!r} is not one of {INPUT_NORMS}: "dataset" '
      '(mean/std), "per_image" (each image standardised) or "none"'
    )
  return input_norm


def max_pool_2x2(x: Array) -> Array:
  """2x2, stride-2 max pool, ``[B, H, W, C] -> [B, H // 2, W // 2, C]``.

  Written as reshape + max because the gradient of ``nn.max_pool`` (a reduce-window) is
  slow on XLA:CPU. An odd trailing row/column is cropped, which is what a VALID 2x2
  pool (PyTorch's ``MaxPool2d(2)``) does anyway.

  The input goes through an optimization barrier (values unchanged). The max's gradient marks
  the window entries equal to the max; without the barrier XLA may recompute ``x``'s producers
  (conv, BatchNorm, ReLU) separately for the max and for that equality test, and a multiply-add
  contracted into an FMA in one of the two copies only breaks the equality: gradients lost, or
  NaN (0 / 0) where no entry of a window matched (docs/results/numerics.md).
  """
  b, h, w, c = x.shape
  x = jax.lax.optimization_barrier(x[:, : h // 2 * 2, : w // 2 * 2])
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class BatchNorm(nn.BatchNorm):
  """``nn.BatchNorm`` with PyTorch's defaults and the agad norm interface.

  ``(x [..., C], *, train, norm_ctx) -> [..., C]`` in ``x.dtype``. ``norm_ctx`` is
  ignored. momentum 0.9 / epsilon 1e-5 are PyTorch's momentum 0.1 / eps 1e-5 (flax
  weights the old average by momentum). Statistics are computed in float32; the output is
  cast back so bf16 compute stays bf16. Set ``axis_name`` (via ``functools.partial``) for
  per-device statistics under ``shard_map``.
  """

  momentum: float = 0.9
  epsilon: float = 1e-5

  def __call__(self, x, *, train: bool, norm_ctx: Mapping | None = None):
    del norm_ctx
    return super().__call__(x, use_running_average=not train).astype(x.dtype)


class MultiBranchBatchNorm(nn.Module):
  """K independent BatchNorms (own scale/bias and running stats), for AFA.

  ``(x [B, ..., C], *, train, norm_ctx) -> [B, ..., C]``. Routing by ``norm_ctx``:

  * ``None`` -> branch 0;
  * ``{'branch': k}`` (python int) -> branch k only, so in training only branch k's
    statistics update and only its scale/bias receive gradients;
  * ``{'mix': w}`` with ``w`` ``[B, K]`` -> ``sum_k w[:, k] * BN_k(x)``, every branch in
    the current mode (all of them update their statistics in training).
  """

  num_branches: int = 2

  @nn.compact
  def __call__(self, x, *, train: bool, norm_ctx: Mapping | None = None):
    ctx = norm_ctx or {}
    branches = [BatchNorm(name=f"branch{k}") for k in range(self.num_branches)]
    if "mix" in ctx:
      w = jnp.asarray(ctx["mix"])
      w = w.reshape(w.shape[:1] + (1,) * (x.ndim - 1) + w.shape[1:])  # [B, 1, .., 1, K]
      out = sum(w[..., k] * bn(x, train=train) for k, bn in enumerate(branches))
      return out.astype(x.dtype)
    k = ctx.get("branch", 0)
    if self.is_initializing():
      # Every branch must own its variables even if init routes to one of them; flax
      # does not update running stats during init, so this has no other effect.
      for bn in branches:
        bn(x, train=train)
    return branches[k](x, train=train)


def dense_inits(scheme: str, fan_in: int) -> dict:
  """``kernel_init``/``bias_init`` of a Dense layer under one of ``DENSE_INITS``."""
  if scheme == "torch":
    init = torch_linear_uniform(fan_in)
    return dict(kernel_init=init, bias_init=init)
  if scheme == "torch_weight":
    return dict(kernel_init=torch_linear_uniform(fan_in), bias_init=nn.initializers.zeros)
  if scheme == "normal_0.01":
    return dict(kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros)
  raise ValueError(f"dense init {scheme!r} is not one of {DENSE_INITS}")


def conv(
  m: nn.Module,
  x: Array,
  features: int,
  kernel: int = 3,
  stride: int = 1,
  *,
  name: str,
  bias: bool = False,
  padding: int | None = None,
  init: Callable | None = None,
) -> Array:
  """Square conv in ``m.dtype``: ``[B, H, W, Cin] -> [B, H', W', features]``.

  Padding defaults to ``kernel // 2`` on both sides (PyTorch's ``padding=1`` for 3x3);
  'SAME' would pad stride-2 convs asymmetrically and shift the sampling grid.
  ``init=None``: the module's ``conv_init`` (its reference code's). A bias starts at zero,
  except under PyTorch's default conv init, where it is U(+-1/sqrt(fan_in)) too.
  """
  p = kernel // 2 if padding is None else padding
  init = init or getattr(m, "conv_init", KAIMING_FAN_OUT)
  bias_init = (
    torch_linear_uniform(kernel * kernel * x.shape[-1])
    if init is TORCH_CONV_DEFAULT
    else nn.initializers.zeros
  )
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=stride,
    padding=p,
    use_bias=bias,
    kernel_init=init,
    bias_init=bias_init,
    dtype=m.dtype,
    name=name,
  )(x)


def norm_act(m: nn.Module, x: Array, name: str, *, train: bool, norm_ctx, relu: bool = True):
  """``m.norm(name=name)`` then (optionally) ReLU; shape preserving."""
  x = m.norm(name=name)(x, train=train, norm_ctx=norm_ctx)
  return nn.relu(x) if relu else x


def site(m: nn.Module, name: str, x: Array, *, train: bool, labels: Array | None) -> Array:
  """Plug-in point + tap named ``name`` inside module ``m``; returns x's replacement.

  Must be called from ``m``'s compact method. The plug-in, if ``m.plugins`` has one, is
  built as child ``plugin_<name with '.' -> '_'>`` of ``m``.
  """
  factory = (m.plugins or {}).get(name)
  if factory is not None:
    # The factory builds the module inside m's compact scope, which binds it under an
    # auto-generated name; clone() rebinds it under a stable, site-derived name so
    # checkpoints do not depend on the plug-in's class. The discarded binding never
    # creates variables.
    plugin = factory().clone(parent=m, name="plugin_" + name.replace(".", "_"))
    x = plugin(x, train=train, labels=labels)
  m.sow("intermediates", name, x)
  # A partial 'perturbations' tree perturbs only the sites it names: flax's perturb raises
  # on a missing entry once the collection is present. While the collection is mutable
  # (init) perturb creates the zero entry as before.
  if m.is_mutable_collection("perturbations") or m.has_variable("perturbations", name):
    return m.perturb(name, x)
  return x


def find_tap(tree: Mapping, name: str):
  """The entry for site ``name`` at any depth of a nested collection.

  Works on 'intermediates' (a tuple of sown values), 'perturbations' and their gradients.
  """
  for path, value in traverse_util.flatten_dict(tree).items():
    if path[-1] == name:
      return value
  raise KeyError(f"no tap named {name!r}")


class Backbone(nn.Module):
  """Attributes and helpers common to all backbones.

  Attributes:
    num_classes: logits width.
    mean, std: per-channel normalisation constants (tuples), applied first.
    dtype: compute dtype; params stay float32 and logits are returned as float32.
    norm: norm factory (see module docstring).
    plugins: site name -> zero-argument module factory, or None.
    norm_hook: zero-argument factory of the per-group ``norm_ctx`` hook (module doc), or None.
    input_norm: how ``prepare`` normalises the pixels (one of ``INPUT_NORMS``):
      ``'dataset'`` ``(x - mean) / std`` with the attributes above; ``'per_image'``
      :func:`per_image_normalize` (mean/std unused); ``'none'`` the raw [0, 1] pixels.

  Subclasses define ``stage_sizes`` (residual units, or conv layers, per stage) and a
  compact ``__call__(x, *, train, labels=None, norm_ctx=None) -> [B, num_classes]``.
  """

  num_classes: int
  mean: tuple
  std: tuple
  dtype: Any = jnp.float32
  norm: Callable[..., nn.Module] = BatchNorm
  plugins: Mapping[str, Callable[[], nn.Module]] | None = None
  input_norm: str = "dataset"
  norm_hook: Callable[[], nn.Module] | None = None

  # Plain class constants (not fields): each backbone's reference-code init.
  conv_init = staticmethod(KAIMING_FAN_OUT)
  dense_init = "torch"

  def __post_init__(self):
    if self.plugins is not None and not isinstance(self.plugins, FrozenDict):
      object.__setattr__(self, "plugins", FrozenDict(self.plugins))
    check_input_norm(self.input_norm)
    super().__post_init__()

  def prepare(self, x: Array) -> Array:
    """Pixels ``[B, H, W, C]`` in [0, 1] -> input normalised per ``input_norm``, in ``dtype``."""
    if self.input_norm == "dataset":
      x = normalize(x, self.mean, self.std)
    elif self.input_norm == "per_image":
      x = per_image_normalize(x)
    return x.astype(self.dtype)

  def norm_group(self, x, group: str, *, train, norm_ctx):
    """The ``norm_ctx`` of norm group ``group`` whose input is ``x`` (``norm_hook``'s, or
    ``norm_ctx`` unchanged without a hook). Call from the backbone's compact method."""
    if self.norm_hook is None:
      return norm_ctx
    hook = self.norm_hook().clone(parent=self, name=f"norm_hook_{group}")
    return hook(x, train=train, norm_ctx=norm_ctx)

  def residual_stages(
    self, x, unit: type["Unit"], widths: Sequence[int], *, train, labels, norm_ctx
  ):
    """Stages of residual units; the first unit of every stage after the first strides 2.

    Units are children named ``stage{s}_unit{i}`` (s 1-indexed, i 0-indexed) with their
    own ``stage{s}.unit{i}.branch`` site. Sites of this module: ``stage{s}.unit{i}`` on
    each unit's output (what the unit returns) and ``stage{s}`` after each stage; the last
    unit's site and ``stage{s}`` see the same tensor (a plug-in at the unit site feeds
    the stage site). A unit site's plug-in is ``plugin_stage{s}_unit{i}``, which cannot
    clash with the unit child ``stage{s}_unit{i}``.
    """
    for s, (n, width) in enumerate(zip(self.stage_sizes, widths), start=1):
      ctx = self.norm_group(x, f"stage{s}", train=train, norm_ctx=norm_ctx)
      for i in range(n):
        tap = f"stage{s}.unit{i}"
        x = unit(
          features=width,
          stride=2 if s > 1 and i == 0 else 1,
          tap=tap,
          dtype=self.dtype,
          norm=self.norm,
          plugins=self.plugins,
          conv_init=self.conv_init,
          name=tap.replace(".", "_"),
        )(x, train=train, labels=labels, norm_ctx=ctx)
        x = site(self, tap, x, train=train, labels=labels)
      x = site(self, f"stage{s}", x, train=train, labels=labels)
    return x

  def plain_stages(
    self,
    x,
    widths: Sequence[int],
    *,
    batch_norm: bool,
    padding=None,
    init: Callable | None = None,
    tap_before_pool: int = 0,
    train,
    labels,
    norm_ctx,
  ):
    """VGG-style stages: ``stage_sizes[s]`` conv(-BN)-ReLU layers then a 2x2 max pool.

    Sites: ``stem`` after the first conv(-BN)-ReLU; ``stage{s}.pre_pool`` after the
    stage's last conv(-BN)-ReLU, right before its pool; ``stage{s}`` after each pool
    except for stage ``tap_before_pool``, tapped before its pool (FSR's VGG placement).
    In that stage ``stage{s}.pre_pool`` and ``stage{s}`` are consecutive sites on the same
    tensor (``pre_pool`` first, so a plug-in there feeds ``stage{s}``'s); every stage keeps
    a ``pre_pool`` site so that name means the same point in every plain backbone.
    """
    for s, (n, width) in enumerate(zip(self.stage_sizes, widths), start=1):
      ctx = self.norm_group(x, f"stage{s}", train=train, norm_ctx=norm_ctx) if batch_norm else None
      for i in range(n):
        x = conv(self, x, width, bias=True, padding=padding, init=init, name=f"stage{s}_conv{i}")
        x = (
          norm_act(self, x, f"stage{s}_bn{i}", train=train, norm_ctx=ctx)
          if batch_norm
          else nn.relu(x)
        )
        if s == 1 and i == 0:
          x = site(self, "stem", x, train=train, labels=labels)
      x = site(self, f"stage{s}.pre_pool", x, train=train, labels=labels)
      if s == tap_before_pool:
        x = max_pool_2x2(site(self, f"stage{s}", x, train=train, labels=labels))
      else:
        x = site(self, f"stage{s}", max_pool_2x2(x), train=train, labels=labels)
    return x

  def head(
    self,
    x,
    *,
    hidden: Sequence[int] = (),
    flatten: bool = False,
    zero_classifier: bool = False,
    train,
    labels,
  ):
    """``features`` site, GAP (or flatten), Dense-ReLU per ``hidden``, ``embedding`` site, logits.

    ``[B, H, W, C] -> [B, num_classes]`` float32. Dense layers start as ``dense_init``
    says; ``zero_classifier``: the classifier starts at zero (uniform output at init).
    """
    x = site(self, "features", x, train=train, labels=labels)
    x = x.reshape(x.shape[0], -1) if flatten else x.mean(axis=(1, 2))
    for j, width in enumerate(hidden):
      inits = dense_inits(self.dense_init, x.shape[-1])
      x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"fc{j}", **inits)(x))
    x = site(self, "embedding", x, train=train, labels=labels)
    zeros = nn.initializers.zeros
    inits = (
      dict(kernel_init=zeros, bias_init=zeros)
      if zero_classifier
      else dense_inits(self.dense_init, x.shape[-1])
    )
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier", **inits)(x)
    return logits.astype(jnp.float32)


class Unit(nn.Module):
  """Base of residual units.

  ``(x [B, H, W, Cin], *, train, labels, norm_ctx) -> [B, H / stride, W / stride, Cout]``.

  ``tap`` is the unit's site prefix (``stage3.unit4``); ``plugins``/``norm``/``dtype``
  are handed down by the backbone because child modules cannot see its attributes.
  """

  features: int
  stride: int
  tap: str
  dtype: Any
  norm: Callable[..., nn.Module]
  plugins: Mapping[str, Callable[[], nn.Module]] | None
  conv_init: Callable = KAIMING_FAN_OUT

  def shortcut(self, x, out: int, *, batch_norm: bool, train, norm_ctx, project_from=None):
    """x if the shape is kept, else a strided 1x1 projection (+BN if ``batch_norm``).

    The projection reads ``project_from`` (default x): pre-activation units project the
    activated input but pass the raw input through the identity.
    """
    if self.stride == 1 and x.shape[-1] == out:
      return x
    y = conv(
      self, x if project_from is None else project_from, out, 1, self.stride, name="shortcut_conv"
    )
    if batch_norm:
      y = norm_act(self, y, "shortcut_bn", train=train, norm_ctx=norm_ctx, relu=False)
    return y
