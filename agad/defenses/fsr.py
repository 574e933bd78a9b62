"""Feature Separation and Recalibration (Kim et al., CVPR 2023), as coded in wkim97/FSR
@aa83b86 (``models/{resnet_fsr,wideresnet34_fsr,vgg_fsr,gumbel_sigmoid}.py``,
``train.py``, ``attacks/pgd.py``, ``test.py``).

Module (``FSRPlugin``, one plug-in at ``objective.fsr.site``). For a feature map
``f [B, H, W, C]``:

    r   = S(f)                                   Separation net (paper Sec. 3.1)
    m   = gumbel_sigmoid(sigmoid(r), tau)        Eq. 2: fsr_mask below
    f+  = m * f,   f- = (1 - m) * f              robust / non-robust features
    f~- = f- + (1 - m) * R(f-)                   Recalibration (resnet_fsr.py:53-58)
    out = f+ + f~-  = f + (1 - m) * R((1 - m) * f)

S and R are each Conv3x3(C->width, no bias)-BN-ReLU, Conv3x3(width->width, no
bias)-BN-ReLU, Conv3x3(width->C, no bias) with ``width = 64`` (resnet_fsr.py:14-22,
41-49: every conv is ``bias=False``). The paper (Sec. 4.1) gives R a final BN-ReLU as
well; the code does not (``rec_bn_relu=False``, the default; True is the paper's). The
plug-in owns its BatchNorms (PyTorch defaults), in batch mode in training passes. One
shared linear head ``h`` (``self.aux = nn.Sequential(nn.Linear(C, K))``) on the global
average pool of f+, f- and f~- gives the three auxiliary predictions, sown into ``aux``
as ``fsr_pos``, ``fsr_neg``, ``fsr_rec`` (``[B, K]``; plus ``fsr_mask_mean [B]``, the
mask's mean per example, a diagnostic). Convs and head start as the backbone's reference
code inits them, because the official modules are members of each backbone and share
its init loop (ResNet-18: PyTorch defaults; WRN: N(0, 2/(9 C_out)) convs and zero Linear
bias; VGG-16: Kaiming fan-out convs and N(0, 0.01^2) Linear): the plug-in reads its
parent's ``conv_init`` / ``dense_init``.

Mask (``gumbel_sigmoid.py``): with ``p = sigmoid(r)``, ``g_i = -log(-log(u_i + 1e-8) +
1e-8)`` and ``u_1, u_2 ~ U(0, 1)`` drawn afresh, per element, in every training forward
pass (the plug-in rng), ``m`` is the first entry of
``softmax{(log(p + 1e-8) + g_1) / (tau + 1e-8), (log(1 - p + 1e-8) + g_2) / (tau + 1e-8)}``,
i.e. ``m ~= sigmoid((r + g_1 - g_2) / tau)``, a binary-concrete sample with logistic
noise ``g_1 - g_2``. Eval passes (``is_eval=True`` in the code: every attack and test)
fix ``u = 0.5``: the noise cancels and ``m ~= sigmoid(r / tau)``. tau = 0.1 makes the
eval mask steep, hence the straight-through adaptive variant below.

Loss (``train.py:139-165``, adversarial inputs only, batch-mean CE):

    L = CE(f(x'), y) + lam_sep [CE(h(f+), y) + CE(h(f-), y')] + lam_rec CE(h(f~-), y)

with lam_sep = lam_rec = 1 and ``y'`` the top *wrong* class of the final adversarial
logits (``get_pred``: the argmax, or the second-best when the argmax is ``y``). With
several FSR modules the paper's Eq. 5 averages the terms over modules, as the code does
over its output lists; one module here.

Objectives. ``fsr`` (standalone) = PGD-AT + the terms, as released: PGD-10 on the
final-logit CE through the eval-mode model (running BN statistics, deterministic mask)
from a uniform start (``attacks/pgd.py``, ``perturb(x, y, True)`` under ``net.eval()``),
then one train-mode pass over ``x'``. ``<objective>+fsr`` (``pgd_at+fsr``, ``trades+fsr``,
``mart+fsr``, the paper's Table 1; the code releases PGD-AT only) adds the terms on the
inner objective's own ``"adv"`` pass (no extra pass) and keeps its attack.

Adaptive evaluation (``adaptive_loss``, run by every evaluation preset; ``ADAPTIVE_VARIANTS``):
  ``""``   main CE + the FSR terms *with the sign an attacker wants* through the eval-mode
           model: ``CE(f(x), y) + lam_sep [CE(h(f+), y) - CE(h(f-), y')] + lam_rec
           CE(h(f~-), y)`` (``adaptive_terms_per_example``). The f- term is descended: the
           defender trains f- to hold the evidence for y' (the most probable wrong class),
           and f- still reaches the output (``f~ = f + (1 - m) R(f-)``), so the attacker
           wants that evidence to grow; ascending the training loss as is would push f-
           away from y', against the main CE term. (The authors' ``test.py`` attacks the
           main-logit CE only, in eval mode: that is the table's plain PGD-20 row.)
  ``"st_t0.5"``, ``"st"``, ``"st_t2"``  main-logit CE through a straight-through mask: the
           forward value is the tau = 0.1 mask, its gradient that of the mask at the
           backward temperature tau_b = 0.5, ``objective.fsr.adaptive_tau_backward``
           (default 1.0) and 2 (the CAS family's ``st_t10`` naming), via the plug-in's
           ``ADAPTIVE_FIELDS`` and ``agad.defenses.with_plugin_overrides``. A small tau_b
           keeps the steep mask's local gradient, a large one sees further along r.

Site per backbone (``objective.fsr.site``, default ``features``):
  ResNet-18            ``features`` = after layer4 (``[B, 4, 4, 512]``), resnet_fsr.py
  WRN-34-10            ``features`` = after the final BN-ReLU (``[B, 8, 8, 640]``)
  VGG-16               ``stage4`` = after its 4th conv stage, before pool 4
                       (``[B, 4, 4, 512]``, vgg_fsr.py): set ``objective.fsr.site=stage4``
                       (VGG's ``features`` is the 1x1 map after pool 5)
  SmallCNN (F-MNIST)   ``features`` = after the second pool (``[B, 4, 4, 64]``); no
                       official placement (the paper has no MNIST-like model)

Parameters added (10 classes): 2 * (9 C w + 2 w + 9 w^2 + 2 w + 9 w C) + (C K + K):
ResNet-18 / VGG-16 (C = 512) 1,259,018 (the paper's Table 7: 11.17 -> 12.43 M and
15.25 -> 16.52 M); WRN-34-10 (C = 640) 1,555,210; SmallCNN (C = 64) 222,346.
``rec_bn_relu`` adds 2 C (BN scale and bias).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from agad.attacks import losses as attack_losses
from agad.defenses import _registry
from agad.defenses._cas_family import aux_logits
from agad.models.layers import TORCH_CONV_DEFAULT, BatchNorm, dense_inits
from agad.objectives import base, defaults
from agad.objectives.pgd_at import pgd_at

EPS = 1e-8  # gumbel_sigmoid.py: self.p_value, in every log and in tau + 1e-8
POS, NEG, REC, MASK_MEAN = "fsr_pos", "fsr_neg", "fsr_rec", "fsr_mask_mean"

# FSR (Kim et al. CVPR 2023; wkim97/FSR @aa83b86).
# Fields and their comments stay aligned (the defaults are their own documentation).
# fmt: off
DEFAULTS = ml_collections.ConfigDict()
DEFAULTS.lam_sep = 1.0            # train.py --lam_sep 1.0 (paper Sec. 4.1: lambda_sep = 1).
DEFAULTS.lam_rec = 1.0            # train.py --lam_rec 1.0 (paper Sec. 4.1: lambda_rec = 1).
DEFAULTS.tau = 0.1                # train.py --tau 0.1: Gumbel-sigmoid temperature (paper Sec. 4.1).
DEFAULTS.site = "features"        # resnet_fsr.py: after layer4 (WRN: after the final BN-ReLU);
                                  # VGG-16: "stage4" (vgg_fsr.py, before pool 4).
DEFAULTS.width = 64               # Separation/Recalibration(num_channel=64): hidden conv width.
DEFAULTS.rec_bn_relu = False      # code: R ends with a bare conv; paper Sec. 4.1: conv-BN-ReLU (True).
DEFAULTS.random_start = "uniform"  # attacks/pgd.py perturb(x, y, True): U(-eps, eps). None: config.attack.
DEFAULTS.attack_bn = "eval"       # net.eval() + is_eval=True in the attack: running stats, u = 0.5.
# Not in the paper or code: the backward temperature of the "st" adaptive attack
# (straight-through mask; forward value at tau). Pitfall 11 of seed_implementations.md.
# "st_t0.5" and "st_t2" sweep it at 0.5 and 2 (ADAPTIVE_VARIANTS).
DEFAULTS.adaptive_tau_backward = 1.0
# fmt: on

# Adaptive variants: name -> the straight-through mask's backward temperature tau_b (None
# for "": the deployed mask, main CE + the FSR terms as an attacker signs them; "default":
# objective.fsr.adaptive_tau_backward). Named like the CAS family's "st" / "st_t10".
ADAPTIVE_VARIANTS = {"": None, "st_t0.5": 0.5, "st": "default", "st_t2": 2.0}


def fsr_mask(r: jax.Array, *, tau: float = 0.1, u: jax.Array | None = None) -> jax.Array:
  """The official ``GumbelSigmoid(tau)(sigmoid(r), is_eval)[:, 0]``, elementwise.

  r: the Separation net's output (any shape). u: ``(2,) + r.shape`` uniform draws in
  [0, 1) for the two Gumbel noises (training), or ``None`` for inference (u = 0.5).
  Returns ``m`` (r's shape, float32, in [0, 1]):

      p = sigmoid(r),  g_i = -log(-log(u_i + 1e-8) + 1e-8)
      m = softmax{(log(p + 1e-8) + g_1) / (tau + 1e-8), (log(1 - p + 1e-8) + g_2) / (tau + 1e-8)}[0]

  (gumbel_sigmoid.py:14-37; paper Eq. 2). Stable public API.
  """
  if not tau > 0:
    raise ValueError(f"fsr_mask: tau must be > 0, got {tau!r} (the official value is 0.1)")
  r = jnp.asarray(r, jnp.float32)
  if u is None:
    u = jnp.full((2,) + r.shape, 0.5, jnp.float32)
  u = jnp.asarray(u, jnp.float32)
  if u.shape != (2,) + r.shape:
    raise ValueError(
      f"fsr_mask: u has shape {u.shape}; it must be (2,) + r.shape = {(2,) + r.shape} "
      "(two uniform draws per element), or None for the deterministic eval mask"
    )
  p = jax.nn.sigmoid(r)
  g = -jnp.log(-jnp.log(u + EPS) + EPS)
  z = jnp.stack(
    [(jnp.log(p + EPS) + g[0]) / (tau + EPS), (jnp.log(1.0 - p + EPS) + g[1]) / (tau + EPS)]
  )
  return jax.nn.softmax(z, axis=0)[0]


class FSRPlugin(nn.Module):
  """``plugin(f [B, H, W, C], *, train, labels) -> f~ [B, H, W, C]`` (see the module doc).

  Training passes that get the ``plugins`` rng draw fresh uniform noise for the mask;
  eval passes (and training passes without an rng) use u = 0.5. ``tau_backward`` (an
  attack-time switch, ``ADAPTIVE_FIELDS``): the mask's forward value is unchanged, its
  gradient is that of the mask at temperature ``tau_backward`` (straight-through).
  """

  num_classes: int
  tau: float = 0.1
  width: int = 64
  rec_bn_relu: bool = False
  tau_backward: float | None = None

  ADAPTIVE_FIELDS = ("tau_backward",)

  def _net(
    self, prefix: str, x: jax.Array, out: int, *, train: bool, last_bn_relu: bool, conv_init, dtype
  ) -> jax.Array:
    """Conv3x3(->w)-BN-ReLU, Conv3x3(w->w)-BN-ReLU, Conv3x3(w->out) [-BN-ReLU]; no biases."""
    for i, width in enumerate((self.width, self.width, out)):
      x = nn.Conv(
        width,
        (3, 3),
        padding=1,
        use_bias=False,
        kernel_init=conv_init,
        dtype=dtype,
        name=f"{prefix}_conv{i}",
      )(x)
      if i < 2 or last_bn_relu:
        x = nn.relu(BatchNorm(name=f"{prefix}_bn{i}")(x, train=train))
    return x

  @nn.compact
  def __call__(
    self, features: jax.Array, *, train: bool, labels: jax.Array | None = None
  ) -> jax.Array:
    del labels
    if features.ndim != 4:
      raise ValueError(
        f"FSRPlugin needs a [B, H, W, C] feature map, got shape {features.shape}: "
        "put it at a spatial site (objective.fsr.site, e.g. 'features' or 'stage4')"
      )
    channels = features.shape[-1]
    # The official modules share their backbone's init loop: read the parent's scheme.
    conv_init = getattr(self.parent, "conv_init", TORCH_CONV_DEFAULT)
    dense_scheme = getattr(self.parent, "dense_init", "torch")
    dtype = getattr(self.parent, "dtype", jnp.float32)
    net = functools.partial(self._net, out=channels, train=train, conv_init=conv_init, dtype=dtype)

    r = net("sep", features, last_bn_relu=False)
    u = None
    if train and self.has_rng(base.PLUGIN_RNG):
      u = jax.random.uniform(self.make_rng(base.PLUGIN_RNG), (2,) + r.shape, jnp.float32)
    mask = fsr_mask(r, tau=self.tau, u=u)
    if self.tau_backward is not None:
      soft = fsr_mask(r, tau=self.tau_backward, u=u)
      mask = soft + jax.lax.stop_gradient(mask - soft)
    mask = mask.astype(features.dtype)
    pos = features * mask
    neg = features * (1 - mask)
    rec = neg + net("rec", neg, last_bn_relu=self.rec_bn_relu) * (1 - mask)

    head = nn.Dense(self.num_classes, name="aux_head", **dense_inits(dense_scheme, channels))
    for name, value in ((POS, pos), (NEG, neg), (REC, rec)):
      self.sow("aux", name, head(jnp.mean(value.astype(jnp.float32), axis=(1, 2))))
    self.sow("aux", MASK_MEAN, jnp.mean(mask.astype(jnp.float32), axis=(1, 2, 3)))
    return pos + rec


def top_wrong_class(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """``y'`` ``[B]``: the argmax of ``logits [B, K]``, or the second-best class where the
  argmax is ``labels`` (train.py ``get_pred``)."""
  top2 = jax.lax.top_k(logits, 2)[1]
  return jnp.where(top2[:, 0] == labels, top2[:, 1], top2[:, 0])


def fsr_terms_per_example(
  logits: jax.Array,
  pos: jax.Array,
  neg: jax.Array,
  rec: jax.Array,
  labels: jax.Array,
  *,
  lam_sep: float = 1.0,
  lam_rec: float = 1.0,
) -> jax.Array:
  """``lam_sep [CE(pos, y) + CE(neg, y')] + lam_rec CE(rec, y)`` per example ``[B]``
  (``y'`` from ``logits``); every array ``[B, K]`` but ``labels [B]``."""
  ce = attack_losses.cross_entropy
  wrong = top_wrong_class(logits, labels)
  return lam_sep * (ce(pos, labels) + ce(neg, wrong)) + lam_rec * ce(rec, labels)


def adaptive_terms_per_example(
  logits: jax.Array,
  pos: jax.Array,
  neg: jax.Array,
  rec: jax.Array,
  labels: jax.Array,
  *,
  lam_sep: float = 1.0,
  lam_rec: float = 1.0,
) -> jax.Array:
  """The FSR terms as the adaptive attack ascends them, per example ``[B]``::

      lam_sep [CE(pos, y) - CE(neg, y')] + lam_rec CE(rec, y)        (y' from ``logits``)

  The training loss has ``+ CE(neg, y')``: the defender trains the Separation net to put
  into f- = (1 - m) f the activations that vote for y', "the wrong class with the highest
  prediction score from the final model output" (paper Eq. 3, Sec. 3.1: f- holds the
  activations "responsible for the most probable misprediction"). FSR does not drop them:
  the output ``f~ = f+ + f~- = f + (1 - m) R(f-)`` keeps all of f. An attacker who wants
  the final prediction wrong (y' first) wants that evidence to grow, in f- as everywhere
  else, so it *descends* CE(h(f-), y'). Ascending it, as an attack on the training loss
  as is does, pushes h(f-) away from y', against the main CE term, i.e. it partly works
  for the defender. The other two terms score features that are summed into the output
  (f+, f~-) against the true label and are ascended, like the main CE. ``-CE <= 0`` is
  bounded above, so the descended term cannot swamp the others.
  """
  ce = attack_losses.cross_entropy
  wrong = top_wrong_class(logits, labels)
  return lam_sep * (ce(pos, labels) - ce(neg, wrong)) + lam_rec * ce(rec, labels)


def fsr_loss(
  logits: jax.Array,
  logits_pos: jax.Array,
  logits_neg: jax.Array,
  logits_rec: jax.Array,
  labels: jax.Array,
  *,
  lam_sep: float = 1.0,
  lam_rec: float = 1.0,
) -> jax.Array:
  """The scalar FSR minimises on adversarial inputs (train.py:139-165), batch means:

      CE(logits, y) + lam_sep [CE(logits_pos, y) + CE(logits_neg, y')] + lam_rec CE(logits_rec, y)

  ``y'`` = the top wrong class of ``logits`` (``top_wrong_class``). ``logits*`` ``[B, K]``
  (the main head and the shared aux head on f+, f-, f~-), ``labels [B]`` int.
  Stable public API.
  """
  main = attack_losses.cross_entropy(logits, labels)
  return jnp.mean(
    main
    + fsr_terms_per_example(
      logits, logits_pos, logits_neg, logits_rec, labels, lam_sep=lam_sep, lam_rec=lam_rec
    )
  )


def fsr_heads(aux: dict) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
  """``[(pos, neg, rec), ...]``, one triple per FSR module found in an ``aux`` collection."""
  pos, neg, rec = (aux_logits(aux, name) for name in (POS, NEG, REC))
  if not pos or not (len(pos) == len(neg) == len(rec)):
    raise ValueError(
      f"FSR found no '{POS}'/'{NEG}'/'{REC}' logits in the model's 'aux' collection "
      f"(got {len(pos)}/{len(neg)}/{len(rec)}): build the model with "
      "agad.defenses.build_model(config, info) so that the FSR plug-in is placed"
    )
  return list(zip(pos, neg, rec))


def _terms_from_aux(logits, aux, labels, lam_sep, lam_rec) -> jax.Array:
  """FSR terms per example ``[B]``, averaged over modules (paper Eq. 5)."""
  heads = fsr_heads(aux)
  return sum(
    fsr_terms_per_example(logits, p, n, r, labels, lam_sep=lam_sep, lam_rec=lam_rec)
    for p, n, r in heads
  ) / len(heads)


def _metrics(logits, aux, labels) -> dict:
  heads = fsr_heads(aux)
  wrong = top_wrong_class(logits, labels)
  ce = attack_losses.cross_entropy
  mean = lambda fn: sum(fn(*h) for h in heads) / len(heads)
  return {
    "fsr_sep_loss": mean(lambda p, n, r: jnp.mean(ce(p, labels) + ce(n, wrong))),
    "fsr_rec_loss": mean(lambda p, n, r: jnp.mean(ce(r, labels))),
    "fsr_pos_accuracy": mean(lambda p, n, r: base.accuracy(p, labels)),
    "fsr_neg_wrong_accuracy": mean(lambda p, n, r: base.accuracy(n, wrong)),
    "fsr_rec_accuracy": mean(lambda p, n, r: base.accuracy(r, labels)),
    "fsr_mask_mean": jnp.mean(jnp.stack([jnp.mean(m) for m in aux_logits(aux, MASK_MEAN)])),
  }


def _config(config) -> ml_collections.ConfigDict:
  cfg = defaults.objective_config(config, "fsr", DEFAULTS)
  if not float(cfg.tau) > 0:
    raise ValueError(f"objective.fsr.tau = {cfg.tau!r} must be > 0 (official 0.1)")
  if not (isinstance(cfg.site, str) and cfg.site):
    raise ValueError(
      f"objective.fsr.site = {cfg.site!r} must be one site name, e.g. 'features' (VGG-16: 'stage4')"
    )
  if int(cfg.width) < 1:
    raise ValueError(f"objective.fsr.width = {cfg.width!r} must be a positive int (official 64)")
  return cfg


def plugins(config: Any, num_classes: int) -> dict:
  """``{objective.fsr.site: FSRPlugin factory}``."""
  cfg = _config(config)
  return {
    cfg.site: functools.partial(
      FSRPlugin,
      num_classes=num_classes,
      tau=float(cfg.tau),
      width=int(cfg.width),
      rec_bn_relu=bool(cfg.rec_bn_relu),
    )
  }


def _state(variables: dict) -> dict:
  return {
    k: v
    for k, v in variables.items()
    if k not in ("params", "aux", "intermediates", "perturbations")
  }


def _adaptive(cfg):
  """The adaptive-loss factory (``ADAPTIVE_VARIANTS``): ``""`` main CE + the FSR terms as
  an attacker signs them (``adaptive_terms_per_example``) through the eval-mode model;
  ``"st_t0.5"`` / ``"st"`` / ``"st_t2"`` main CE through straight-through masks, backward
  at tau_b = 0.5 / ``adaptive_tau_backward`` / 2."""
  lam_sep, lam_rec = float(cfg.lam_sep), float(cfg.lam_rec)

  def adaptive_loss(net, variables):
    params, state = variables["params"], _state(variables)

    def combined(x, labels):
      out = base.forward(net, params, state, x, mode="eval")
      heads = fsr_heads(out.aux)
      terms = sum(
        adaptive_terms_per_example(out.logits, p, n, r, labels, lam_sep=lam_sep, lam_rec=lam_rec)
        for p, n, r in heads
      ) / len(heads)
      return attack_losses.cross_entropy(out.logits, labels) + terms

    def straight_through(tau_backward: float):
      st_net = _registry.with_plugin_overrides(net, tau_backward=tau_backward)

      def fn(x, labels):
        return attack_losses.cross_entropy(
          base.forward(st_net, params, state, x, mode="eval").logits, labels
        )

      return fn

    variants = {}
    for name, tau_b in ADAPTIVE_VARIANTS.items():
      if tau_b is None:
        variants[name] = combined
      else:
        variants[name] = straight_through(
          float(cfg.adaptive_tau_backward if tau_b == "default" else tau_b)
        )
    return variants

  return adaptive_loss


def transform(inner: base.Objective, model, config) -> base.Objective:
  """``<objective>+fsr``: ``inner``'s loss + the FSR terms (averaged over modules) on its
  ``"adv"`` pass, no extra forward pass; ``inner``'s attack; FSR's adaptive variants."""
  del model
  cfg = _config(config)
  lam_sep, lam_rec = float(cfg.lam_sep), float(cfg.lam_rec)

  def terms(params, passes, batch, key, step):
    del params, key, step
    if "adv" not in passes:
      raise ValueError(
        f"+fsr needs an inner objective with an 'adv' pass; {inner.name} has {sorted(passes)}"
      )
    out, labels = passes["adv"], batch["label"]
    value = jnp.mean(_terms_from_aux(out.logits, out.aux, labels, lam_sep, lam_rec))
    return value, _metrics(out.logits, out.aux, labels)

  return base.add_terms(inner, "fsr", terms)._replace(adaptive_loss=_adaptive(cfg))


def fsr(model, config) -> base.Objective:
  """FSR as released: PGD-AT (final-logit CE attack, eval mode, uniform start; fields
  ``random_start`` / ``attack_bn``) + the FSR terms on the adversarial pass."""
  cfg = _config(config)
  attack = defaults.TrainingAttack(model, config, cfg)

  def generate(params, model_state, aux_state, batch, key, step):
    del aux_state
    return attack(params, model_state, batch["image"], batch["label"], key, loss="ce", step=step)

  inner = pgd_at(model, config)._replace(
    generate=generate, bn_policy=base.BNPolicy(attack=attack.bn, update="adversarial")
  )
  return transform(inner, model, config)._replace(name="fsr")


def objective(model, config) -> base.Objective:
  """The standalone ``fsr`` objective of the config grammar (the defense contract)."""
  return fsr(model, config)
