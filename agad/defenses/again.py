"""AGAIN: attribution span enlargement (+ hybrid feature fusion), Yin et al. CVPR 2023, as
coded in InsLin/AGAIN @911f238 (``AGAIN_with_AWP/models/wideresnet_AGAIN_woHFF.py``,
``train_awp_again_cifar.py``; ``../shared/reference/seed_implementations.md`` section 1).

AGAIN is CAS (:mod:`agad.defenses.cas`) with label mixing in the training mask.

Plug-in (``ASEPlugin``, one per site, ``features A [B, H, W, C]`` or ``[B, C]``): an
auxiliary ``Linear(C, K)`` on the global-average-pooled *unmasked* features gives aux
logits ``z = GAP(A) W^T + b`` (sown as ``aux/again_logits``; ``W [K, C]``, stored as the
``[C, K]`` kernel). The features are multiplied channel-wise by a mixed *raw, signed*
weight row (paper Eq. 4; no sigmoid, no normalisation, as coded)::

    training (labels given):  A_hat = A * (alpha W[y] + (1 - alpha) W[y'])      alpha = 0.6
    eval (or no labels):      A_hat = A * W[argmax z]

``y' = y[randperm(B)]`` is drawn per site and per training pass from the plug-in rng
(``self.make_rng('plugins')``), so ``y'`` may equal ``y`` for some rows, as the code's
``y[torch.randperm(B)]``. ``alpha = 1`` is CAS bit for bit (``1 * a + 0 * b == a``).

Hybrid feature fusion (paper Sec. 4.2, Eqs. 5-6; *not called* in the released code, whose
file is "woHFF"): ``hff=True`` applies :func:`hybrid_feature_fusion` to ``A`` before ASE
in training passes (identity at eval).

Objective (``again``, PGD-AT based, as coded): ``CE(f(x'), y) + weight * mean_k
CE(z_k(x'), y)``, ``weight = 2`` over the ``K = 2`` heads (the paper's Eq. 7 has weight 1
and one head). Attack: PGD-10 on the same combined per-example loss through the
*eval-mode* model (running BN statistics, predicted-label masks), from ``x + 0.001 N(0,
I)`` (``random_start="normal"``), step ``config.attack.step_size`` (2/255 in the CIFAR
configs = the code; the paper's 4/255 is ``objective.again.step_size``). The update runs
in train mode with the label-mixed masks; BN statistics are updated by that pass only.

Transform (``mart+again``, ``pgd_at+again``): adds ``weight * mean_k CE(z_k(x'), y)`` on
the inner objective's own ``"adv"`` pass (no extra forward pass), keeping its attack
(MART's CE attack runs through the eval-mode model, so it also sees predicted-label
masks). ``again+awp``: AWP's proxy ascends the AGAIN loss and perturbs every >= 2-D
tensor, the ASE heads' kernels included (``awp.weight_perturbation``), as the official
``utils_awp.py``. The paper-only "gradual probability" schedule (Sec. 4.3, algorithm in an
appendix that is not public) is the option ``schedule``; only ``"none"`` is implemented.

Adaptive losses (``Objective.adaptive_loss``): ``""`` the combined main + aux loss through
the eval-mode model (the authors' own evaluation, ``attack_test.py``); ``"st"`` the same
value with the hard predicted-label masks' gradient replaced by that of the soft mask
``softmax(z) W`` (straight-through / BPDA, via ``ADAPTIVE_FIELDS`` and
``defenses.with_plugin_overrides``).

Sites (``plugins(config, K)``; ``objective.again.sites`` overrides the per-backbone default
``DEFAULT_SITES[config.model.name]``, or names a preset, ``("paper",)`` or ``("code",)``,
``SITE_PRESETS``):
  ``"paper"`` one ASE "in the second last layer of the model" (Fig. 2 caption; Sec. 3 and
            5.5): ``features``, the last feature map before GAP and the classifier. The
            paper's ResNet-18 results use it: Table 5 ablates *one* site at a time and its
            "Layer4" row (87.88 / 54.43 / 53.13 / 55.80) is Table 2's AGAIN-PGD-AT row.
  ``"code"``  the released WRN code's two sites: the residual branch of the last unit of
            the last stage (WRN: after that unit's BN-ReLU, ``stage3.unit[-1].branch``,
            640x8x8, masking the conv branch only) and ``features`` (after the final
            BN-ReLU).
Defaults: ResNet-18/34/50 ``"paper"`` (no code was released for them); WRNs and
PreActResNet-18 ``"code"``; see ``DEFAULT_SITES`` for the others.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from agad.attacks import losses as attack_losses
from agad.defenses import _cas_family as family
from agad.defenses import _registry
from agad.defenses._cas_family import CASPlugin
from agad.models.layers import torch_linear_uniform
from agad.objectives import base, defaults

AUX_NAME = "again_logits"  # the aux head's logits, sown per site
OTHER_LABELS_NAME = "again_other"  # y' of a training pass, sown per site (tests, inspection)

# The paper's placement: one ASE "in the second last layer of the model" (Fig. 2 caption;
# Sec. 3 visualises "the second last layer"; Sec. 5.5: the deeper the better). On agad's
# backbones that is the ``features`` site, the last feature map before GAP and the
# classifier (ResNet: the output of layer4, [B, 4, 4, 512 e], the same tensor as ``stage4``
# and ``stage4.unit[-1]``). Table 5 ("the effect of our proposed method at different layers")
# moves that ONE site over Layer1..Layer4; its "Layer4" row (clean 87.88, PGD-20 54.43,
# PGD-100 53.13, C&W 55.80) is Table 2's AGAIN-PGD-AT row, i.e. the paper's ResNet-18
# results use the single layer4 site.
PAPER_SITES = {
  name: ("features",)
  for name in (
    "resnet18",
    "resnet34",
    "resnet50",
    "preact_resnet18",
    "wrn34_10",
    "wrn28_10",
    "wrn16_8",
    "tiny_bn",
  )
}

# The released code's placement (WRN-34-10 only, wideresnet_AGAIN_woHFF.py): two sites, the
# input of the last unit's conv branch of the last stage after that unit's BN-ReLU, and
# after the final BN-ReLU. On the post-activation ResNets the branch site is the last
# unit's residual branch output (after its last BN, before the addition): the closest
# "conv branch only" point they have.
CODE_SITES = {
  "wrn34_10": ("stage3.unit[-1].branch", "features"),
  "wrn28_10": ("stage3.unit[-1].branch", "features"),
  "wrn16_8": ("stage3.unit[-1].branch", "features"),
  "preact_resnet18": ("stage4.unit[-1].branch", "features"),
  "resnet18": ("stage4.unit[-1].branch", "features"),
  "resnet34": ("stage4.unit[-1].branch", "features"),
  "resnet50": ("stage4.unit[-1].branch", "features"),
  "tiny_bn": ("stage1.unit[-1].branch", "features"),
}

# ``objective.again.sites = ("paper",)`` / ``("code",)`` (or the bare string): the
# placement above for the backbone.
SITE_PRESETS = {"paper": PAPER_SITES, "code": CODE_SITES}

# Per-backbone default sites (``config.model.name``), overridden by objective.again.sites.
DEFAULT_SITES = {
  # As coded for WRN-34-10 (the only released model): CODE_SITES.
  "wrn34_10": CODE_SITES["wrn34_10"],
  "wrn28_10": CODE_SITES["wrn28_10"],
  "wrn16_8": CODE_SITES["wrn16_8"],
  # The code's placement on the pre-activation ResNet-18 (its last stage is stage 4).
  "preact_resnet18": CODE_SITES["preact_resnet18"],
  # The paper's ResNet-18 (no code released): its one site in the second last layer,
  # after layer4 (PAPER_SITES; Table 5 "Layer4" = Table 2 AGAIN-PGD-AT). The code's two
  # sites: objective.again.sites=("code",).
  "resnet18": PAPER_SITES["resnet18"],
  "resnet34": PAPER_SITES["resnet34"],
  "resnet50": PAPER_SITES["resnet50"],
  # Not in the paper. SmallCNN, like the WRN placement, two sites in the last conv stage:
  # after its last conv-ReLU (8x8x64, before pool 2) and after pool 2 (4x4x64, before
  # flattening). ("stage1", "features") was worse on the Fashion-MNIST table recipe (seed
  # 0, validation at epoch 1: clean 61.1 / worst 9.3 vs 73.3 / 43.7; docs/results/again.md).
  # VGG-16: after its 4th and 5th stage.
  "smallcnn": ("stage2.pre_pool", "features"),
  "smallcnn_bn": ("stage2.pre_pool", "features"),
  "vgg16": ("stage4", "features"),
  # Test backbone (one residual unit): the WRN placement.
  "tiny_bn": CODE_SITES["tiny_bn"],
}

# AGAIN (Yin et al. CVPR 2023; InsLin/AGAIN @911f238, AGAIN_with_AWP/).
# Fields and their comments stay aligned (the defaults are their own documentation).
# fmt: off
DEFAULTS = ml_collections.ConfigDict()
# Eq. 4's alpha; mask alpha W[y] + (1 - alpha) W[y']. Paper Sec. 5.2.1 and code: 0.6.
# 1.0 is CAS (bit for bit).
DEFAULTS.alpha = 0.6
# CE(f(x'), y) + weight * mean_k CE(aux_k(x'), y): code 2 (train_awp_again_cifar.py, the
# CAS --beta 2, averaged over 2 heads); paper Eq. 7: 1 with one head.
DEFAULTS.weight = 2.0
# ASE sites; () = DEFAULT_SITES[config.model.name] (WRN as coded: last unit's branch of
# block3 and the final features; ResNet-18/34/50 as in the paper: the one site after
# layer4). ("paper",) / ("code",): that placement for the backbone (SITE_PRESETS). A tuple
# of site names or aliases (or one name) overrides it.
DEFAULTS.sites = ()
# Training-attack start: code x + 0.001 N(0, I) (train_awp_again_cifar.py). None: config.attack.
DEFAULTS.random_start = "normal"
# BN (and mask) mode of the training attack: code model.eval() -> running statistics and
# predicted-label masks. None: config.attack.bn.
DEFAULTS.attack_bn = "eval"
# Training-attack step size; 0: config.attack.step_size (2/255 in the CIFAR configs = the
# code's --step-size 2/255). Paper Sec. 5.2.1: 4/255 (set 4/255 here for "paper").
DEFAULTS.step_size = 0.0
# Hybrid feature fusion before ASE in training passes (paper Sec. 4.2, Eqs. 5-6). The code
# defines HFF() but never calls it ("woHFF"): off.
DEFAULTS.hff = False
# sigma(.) = sqrt(var + hff_eps) over the spatial axes per example and channel (not given in
# the paper; AdaIN/MixStyle use 1e-5 / 1e-6).
DEFAULTS.hff_eps = 1e-5
# The paper's "gradual probability" of using AGAIN instead of plain AT (Sec. 4.3; its
# algorithm is in an unpublished appendix; not in the code): "none" only.
DEFAULTS.schedule = "none"
# fmt: on


def ase_weights(
  class_weights: jax.Array, labels: jax.Array, other_labels: jax.Array, *, alpha: float = 0.6
) -> jax.Array:
  """The ASE training mask ``[B, C] = alpha W[labels] + (1 - alpha) W[other_labels]``.

  Stable public API (external checks call it). ``class_weights [C, K]`` (the aux head's
  kernel, ``W^T``), ``labels``/``other_labels [B]`` int. Paper Eq. 4 with the raw signed
  weight rows of the code (``wideresnet_AGAIN_woHFF.py``: ``0.6 * fc.weight[y] + 0.4 *
  fc.weight[y[randperm]]``); ``alpha = 1`` gives CAS's ``W[labels]`` exactly.
  """
  if class_weights.ndim != 2:
    raise ValueError(f"class_weights must be the [C, K] kernel, got shape {class_weights.shape}")
  rows = class_weights.T  # [K, C]
  # One-hot products, not gathers: the gather's gradient (a scatter-add) came out NaN for
  # valid labels in some XLA:CPU compilations of the train step (docs/results/numerics.md).
  coefficients = alpha * jax.nn.one_hot(labels, rows.shape[0], dtype=rows.dtype) + (
    1.0 - alpha
  ) * jax.nn.one_hot(other_labels, rows.shape[0], dtype=rows.dtype)
  return jnp.dot(coefficients, rows, precision=jax.lax.Precision.HIGHEST)


def _moments(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  axes = tuple(range(1, x.ndim - 1))
  mu = jnp.mean(x, axis=axes, keepdims=True)
  sigma = jnp.sqrt(jnp.var(x, axis=axes, keepdims=True) + eps)
  return mu, sigma


def adain(content: jax.Array, style: jax.Array, eps: float = 1e-5) -> jax.Array:
  """AdaIN(c, s) = sigma(s) (c - mu(c)) / sigma(c) + mu(s), statistics per example and
  channel over the spatial axes (``[B, H, W, C]``)."""
  mu_c, sigma_c = _moments(content, eps)
  mu_s, sigma_s = _moments(style, eps)
  return sigma_s * (content - mu_c) / sigma_c + mu_s


def hybrid_feature_fusion(
  features: jax.Array, permutation: jax.Array, gammas: jax.Array, *, eps: float = 1e-5
) -> jax.Array:
  """Hybrid feature fusion (paper Sec. 4.2, Eqs. 5-6) of ``features A [B, H, W, C]``.

  ``A' = A[permutation]`` (the shuffled batch, the style data), ``A1 = AdaIN(A, A')``,
  ``A2 = AdaIN(A', A)``; with ``gammas [B, 4]`` (rows in the simplex, e.g. Dirichlet(1))::

      mu_hat    = g1 mu(A)    + g2 mu(A')    + g3 mu(A1)    + g4 mu(A2)        (Eq. 5)
      sigma_hat = g1 sigma(A) + g2 sigma(A') + g3 sigma(A1) + g4 sigma(A2)
      HFF(A)    = sigma_hat (A - mu(A)) / sigma(A) + mu_hat                     (Eq. 6)

  ``mu``/``sigma`` per example and channel over the spatial axes, ``sigma =
  sqrt(var + eps)``. One-hot ``gammas = e1`` is the identity (up to rounding); ``e2`` is
  ``AdaIN(A, A')``. Gradients flow through every statistic (the paper detaches nothing).
  """
  if features.ndim < 3:
    raise ValueError(
      f"hybrid feature fusion needs spatial axes [B, H, W, C]; got shape {features.shape} "
      "(a pooled site): put the ASE plug-in at a feature map or set objective.again.hff=False"
    )
  a = features
  a_style = jnp.take(a, permutation, axis=0, mode="clip")  # a permutation: in range
  a1 = adain(a, a_style, eps)
  a2 = adain(a_style, a, eps)
  stats = [_moments(t, eps) for t in (a, a_style, a1, a2)]
  g = gammas.astype(a.dtype).reshape((a.shape[0],) + (1,) * (a.ndim - 2) + (4,))
  mu_hat = sum(g[..., i : i + 1] * stats[i][0] for i in range(4))
  sigma_hat = sum(g[..., i : i + 1] * stats[i][1] for i in range(4))
  mu, sigma = stats[0]
  return sigma_hat * (a - mu) / sigma + mu_hat


class ASEPlugin(CASPlugin):
  """``plugin(features, *, train, labels) -> features``: the ASE module at one site.

  CASPlugin's head and eval mask (``W[argmax z]``, ``straight_through`` for adaptive
  attacks) with the training mask :func:`ase_weights` (``alpha``, ``y' = y[perm]`` from the
  plug-in rng). A training pass with labels must get the ``'plugins'`` rng (every agad
  objective passes ``base.pass_key``); ``hff=True`` applies hybrid feature fusion (rng
  too) before ASE in training passes.
  """

  alpha: float = 0.6
  hff: bool = False
  hff_eps: float = 1e-5

  @nn.compact
  def __call__(
    self, features: jax.Array, *, train: bool, labels: jax.Array | None = None
  ) -> jax.Array:
    mixing = train and labels is not None
    if (mixing or (train and self.hff)) and not self.has_rng(base.PLUGIN_RNG):
      raise ValueError(
        f"ASEPlugin (alpha={self.alpha}, hff={self.hff}) draws y' = y[perm] in a training "
        f"pass and needs the '{base.PLUGIN_RNG}' rng: pass rng=base.pass_key(key, i) to "
        f"base.forward (or rngs={{'{base.PLUGIN_RNG}': key}} to model.apply)"
      )
    if train and (mixing or self.hff):
      k_labels, k_perm, k_gamma = jax.random.split(self.make_rng(base.PLUGIN_RNG), 3)
    if train and self.hff:
      batch = features.shape[0]
      gammas = jax.random.dirichlet(k_gamma, jnp.ones((4,), jnp.float32), (batch,))
      features = hybrid_feature_fusion(
        features, jax.random.permutation(k_perm, batch), gammas, eps=self.hff_eps
      )
    channels = features.shape[-1]
    init = torch_linear_uniform(channels)
    kernel = self.param("kernel", init, (channels, self.num_classes), jnp.float32)
    bias = self.param("bias", init, (self.num_classes,), jnp.float32)
    pooled = jnp.mean(features.astype(jnp.float32), axis=tuple(range(1, features.ndim - 1)))
    logits = pooled @ kernel + bias
    self.sow("aux", AUX_NAME, logits)
    if mixing:
      other = jnp.take(
        labels, jax.random.permutation(k_labels, labels.shape[0]), axis=0, mode="clip"
      )
      self.sow("aux", OTHER_LABELS_NAME, other)
      mask = ase_weights(kernel, labels, other, alpha=self.alpha)
    else:
      mask = attack_losses.rows(kernel.T, jnp.argmax(logits, axis=-1))  # [B, C]: W[argmax z]
      if self.straight_through:
        mask = family.straight_through_mask(mask, logits, kernel, self.st_temperature)
    mask = mask.reshape((mask.shape[0],) + (1,) * (features.ndim - 2) + (channels,))
    return features * mask.astype(features.dtype)


# ``CE(f(x), y) + weight * mean_k CE(z_k(x), y)`` per example ``[B]`` (``k`` over sites).
again_per_example = family.per_example_fn("AGAIN", AUX_NAME)


def _config(config) -> ml_collections.ConfigDict:
  cfg = defaults.objective_config(config, "again", DEFAULTS)
  if cfg.schedule != "none":
    raise NotImplementedError(
      f"objective.again.schedule={cfg.schedule!r}: the paper's gradual probability of using AGAIN "
      "instead of plain AT (Sec. 4.3) is specified only in its unpublished appendix and is absent "
      "from the official code; use schedule='none'"
    )
  if float(cfg.step_size) < 0:
    raise ValueError(
      f"objective.again.step_size={cfg.step_size} must be > 0, or 0 for config.attack.step_size"
    )
  if not 0.0 <= float(cfg.alpha) <= 1.0:
    raise ValueError(
      f"objective.again.alpha={cfg.alpha} must be in [0, 1] (paper: [0.5, 1], default 0.6)"
    )
  model = config.get("model") if hasattr(config, "get") else None
  preset = _preset(cfg.sites)
  if preset and model is not None:
    _preset_sites(preset, model.name)  # up front: a preset the backbone lacks
  return cfg


def _preset(sites) -> str | None:
  """The preset ``sites`` names: ``"code"`` or ``("code",)`` (the form a tuple-typed config
  field takes: ``--config.objective.again.sites='("code",)'``); else None."""
  names = (sites,) if isinstance(sites, str) else tuple(sites or ())
  return names[0] if len(names) == 1 and names[0] in SITE_PRESETS else None


def _preset_sites(preset: str, model_name: str) -> tuple[str, ...]:
  table = SITE_PRESETS[preset]
  if model_name not in table:
    raise ValueError(
      f"objective.again.sites=('{preset}',): that placement is defined for {sorted(table)}, "
      f"not for model {model_name!r}; name the sites instead, e.g. "
      "--config.objective.again.sites='(\"features\",)'"
    )
  return table[model_name]


def sites_for(config: Any) -> tuple[str, ...]:
  """``objective.again.sites``: site names, a preset (``("paper",)`` / ``("code",)``,
  ``SITE_PRESETS``) resolved for ``config.model.name``, or ``()`` for the backbone's
  default (``DEFAULT_SITES``)."""
  cfg = _config(config)
  name = config.model.name
  sites = cfg.sites
  if _preset(sites):
    return _preset_sites(_preset(sites), name)
  if sites:
    return (sites,) if isinstance(sites, str) else tuple(sites)
  if name not in DEFAULT_SITES:
    raise ValueError(
      f"AGAIN has no default sites for model {name!r} (defaults exist for "
      f"{sorted(DEFAULT_SITES)}); set --config.objective.again.sites='(\"site\", ...)' "
      f"or a preset, one of {sorted(SITE_PRESETS)}"
    )
  return DEFAULT_SITES[name]


def plugins(config: Any, num_classes: int) -> dict:
  """``{site: ASEPlugin factory}`` for :func:`sites_for` (aliases resolved by build_model)."""
  cfg = _config(config)
  factory = functools.partial(
    ASEPlugin,
    num_classes=num_classes,
    alpha=float(cfg.alpha),
    hff=bool(cfg.hff),
    hff_eps=float(cfg.hff_eps),
  )
  return {site: factory for site in sites_for(config)}


def again(model, config) -> base.Objective:
  """AGAIN objective (PGD-AT + ASE heads, as coded); fields from ``config.objective.again``."""
  cfg = _config(config)
  attack = defaults.TrainingAttack(model, config, cfg)
  weight = float(cfg.weight)
  step_size = float(cfg.step_size) or None  # 0: config.attack.step_size

  def combined_fn(params, model_state, labels, rng):
    model_state = family.without_aux(model_state)

    def fn(x):  # eval mode: predicted-label masks; "batch" mode: label-mixed masks, rng fixed
      out = base.forward(model, params, model_state, x, mode=attack.bn, labels=labels, rng=rng)
      return again_per_example(out.logits, out.aux, labels, weight)

    return fn

  def generate(params, model_state, aux_state, batch, key, step):
    del aux_state
    # Eval mode (the code's) draws nothing in the model: the attack gets ``key`` itself.
    k_attack, k_plugins = (key, None) if attack.bn == "eval" else jax.random.split(key)
    fn = combined_fn(params, model_state, batch["label"], k_plugins)
    return attack.general(fn, batch["image"], k_attack, step=step, step_size=step_size)

  return base.Objective(
    "again",
    base.no_aux_state,
    generate,
    family.adversarial_loss(model, again_per_example, AUX_NAME, weight),
    base.BNPolicy(attack=attack.bn, update="adversarial"),
    _adaptive(weight),
  )


def transform(inner: base.Objective, model, config) -> base.Objective:
  """``<objective>+again``: ``inner``'s loss + ``weight * mean_k CE(z_k(x'), y)`` on its
  ``"adv"`` pass (the heads exist because ``plugins`` placed them); ``inner``'s attack."""
  del model
  weight = float(_config(config).weight)
  return family.heads_transform(inner, "again", AUX_NAME, weight, _adaptive(weight))


def _adaptive(weight: float):
  """AGAIN's adaptive losses (the CAS family's variants, ``_cas_family.ADAPTIVE_VARIANTS``) on
  :func:`again_per_example`."""
  return family.adaptive_factory(again_per_example, weight)


def recipe(c, *, dataset: str, model: str, spec: str, smoke: bool) -> None:
  """``wrn34_10,again+awp`` on CIFAR-10 and CIFAR-100: AGAIN's released recipe, InsLin/AGAIN
  ``train_awp_again_cifar.py`` = AWP's TRADES trainer: 200 epochs, lr 0.1 x0.1 at epochs 100
  and 150, PGD-10 step 2/255 at eps 8/255 (the CIFAR configs' defaults), AWP gamma 5e-3 /
  proxy lr 0.1 from epoch 10 (1-indexed, i.e. 9 epochs without). The paper's schedule (120
  epochs, decays at 75/90/100, step 4/255) is an override. ``smoke`` still shrinks everything.
  """
  del smoke
  if dataset not in ("cifar10", "cifar100") or (model, spec) != ("wrn34_10", "again+awp"):
    return
  c.num_epochs = 200
  c.optim.boundaries = (100, 150)
  c.objective.awp = _registry.defaults("awp")
  c.objective.awp.gamma = 0.005
  c.objective.awp.proxy_lr = 0.1
  c.objective.awp.warmup_steps = 9 * ((50_000 - c.data.val_size) // c.batch_size)  # 9 * 382


def objective(model, config) -> base.Objective:
  """The standalone ``again`` objective of the config grammar (the defense contract)."""
  return again(model, config)
