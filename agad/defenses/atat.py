"""ATAT: attention-transfer adversarial training (Li, Feng, Wu, Yu, Zheng, "Adversarial
Robustness via Attention Transfer"), with the official code
lizhuorong/Adversarial-Robustness-via-Attention-Transfer @652c02e (TF 1.4, a fork of
MadryLab/cifar10_challenge: ``cifar10/{train_tsf,model,model1,pgd_attack,eval_tsf}.py``;
in ``cifar100/`` the roles of ``model.py`` and ``model1.py`` are swapped). The card
``docs/defenses/atat.md`` compares paper, code and agad point by point.

Teacher: a naturally trained run (a ``standard`` run; the code restores Madry's
``models/naturally_trained/checkpoint-70000``, cifar10/train_tsf.py:110, or
``models/nat/checkpoint-100000``, cifar100/train_tsf.py:115), frozen, eval mode, clean
inputs; loaded by ``Objective.frozen`` from ``objective.atat.teacher.{workdir, step}`` and
checked against the student's config (dataset, classes, image shape, model, input
normalisation) before training. Where the student starts is ``student_start``:

* ``"teacher"`` (``paper``, ``logit_mse``, ``cam_mse``): from the teacher's weights (paper
  Sec. 3.2, "initialized with the same parameters as the original network"; pass
  ``--config.init.workdir=<the teacher's workdir>``, a warning names it otherwise), with
  the learning-rate schedule from step 0.
* ``"code"`` (``code_cifar10``, ``code_cifar100``): from random init, as both
  train_tsf.py do: the student's variables live in scope ``new`` (cifar10/model.py:31,
  cifar100/model1.py:31), are initialised at random (train_tsf.py:109 / 114 in cifar10/ /
  cifar100/) and ``saver1`` restores only the variables outside it (cifar10/train_tsf.py:61-65,
  90, 110; cifar100/train_tsf.py:64-68, 94, 115), i.e. the teacher and ``global_step``
  (Madry's train.py saves every global variable); the piecewise schedule is a function of
  ``global_step`` (cifar10/train_tsf.py:42, 49-52), so it starts where the teacher's step
  puts it (70000 and 100000: past both boundaries, lr 0.001 throughout). agad starts the schedule at the teacher
  run's restored step (the frozen record's ``schedule_start_step``, read by the trainer)
  and refuses a set ``init.workdir``.

Per batch ``(x, y)`` of ``B`` examples: ``x' = PGD(x, y)`` (CE, uniform start, 7 steps,
config.json ``num_steps 7, step_size 2.0, epsilon 8.0`` on 0-255), then **one train-mode
pass of the student over [x; x']** (one BN batch of 2B images; train_tsf.py) and the
teacher's eval-mode pass over x.

Grad-CAM (paper Eq. 3; the code's ``costs`` scope): at a site with value ``A [N, H, W, C]``
and logits ``z``, ``ATT(x)[b] = relu(sum_c mean_hw(d z[b, y_b] / d A[b, ..., c]) A[b, ..., c])``
with the **true** class ``y``. The student's maps come from its training pass: a zero
perturbation at each site and one VJP of ``sum_b z[b, y_b]`` (:func:`grad_cam_pass`),
trained through by double backprop (the code's ``tf.gradients`` inside the loss). In
train mode that gradient is per example where no BN follows the site: ``features`` (the
default, the code's ``unit_last`` map) and ``embedding``.

The code's maps (``cam_scale="code"``): it differentiates
``reduce_mean(pre_softmax * one_hot(y))`` (cifar100/model1.py:103-107 student,
cifar100/model.py:109-113 teacher, cifar10/model.py:108-114), a mean over the ``N x K``
entries of the graph's batch, so every map carries ``1 / (N K)``: ``N = 2B`` for the
student, ``B`` for the teacher. The CIFAR-100 student's map enters its loss **before**
ReLU: ``self.cam = relu(cam)`` is computed but the raw ``cam`` is split
(cifar100/model1.py:112-116; ``student_relu="no"``); the teacher's map is ReLU'd
(cifar100/model.py:118-120). The CIFAR-10 file ReLUs its student map (cifar10/model.py:120)
but optimises no map term.

Variants (``objective.atat.variant``; every run records it and the resolved settings):

``paper`` (default; Eq. 5-7, per example, averaged over the batch like the CE):
  ``mean_2B CE + lam_at sum_sites mean_b(||T(x)_b - S(x')_b||_2 + ||T(x)_b - S(x)_b||_2)
  + lam_lp mean_b ||z_S(x)_b - z_S(x')_b||_2``, maps min-max normalised per example
  (``cam_norm``, agad's choice), plain L2 norms (p = 2), lam = 1 (the ablation's 1/0).
``code_cifar10`` (cifar10/model.py:139-142; **no attention term**):
  ``mean_2B CE + lam_lp [mean_{B,K}(z_S(x) - z_T(x))^2 + mean_{B,K}(z_S(x') - z_T(x))^2]``;
  ``tf.losses.mean_squared_error(weights=0.5, reduction=MEAN)`` divides by the summed
  weights, so the 0.5 cancels: lam_lp = 1. Student from random init (``student_start``).
``code_cifar100`` (cifar100/model1.py:99-131; no logit term):
  ``mean_2B CE + lam_at sum_sites [mean_{B,H,W}(S(x) - T(x))^2 + mean_{B,H,W}(S(x') - T(x))^2]``
  on unnormalised maps with the code's ``1/(N K)`` scale and the pre-ReLU student map:
  the map term is ~1e-8 of the per-example one, i.e. numerically CE on [x; x'] plus a
  vanishing term. Student from random init.
``logit_mse`` / ``cam_mse``: the two code losses as agad first implemented them: the
  student from its teacher, the schedule from step 0, and (``cam_mse``) per-example
  maps ``d z[b, y_b] / dA`` with a ReLU'd student map.

Training attack: PGD-7 (``steps``), uniform start, CE, eps and step size from
``config.attack``. The code attacks the train-mode graph, whose BN moving averages update
on every attack step; agad attacks with batch statistics and leaves the running averages
alone (``attack_bn="batch"``). Evaluation: the plain backbone (``adaptive_loss`` None);
the official ``eval_tsf.py:48`` uses train-mode BN at test time, agad never does, and the
paper reports no AutoAttack, so ATAT runs are evaluated with ``table_aa``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from agad.attention import functional as maps_lib
from agad.attention import model as attention_model
from agad.defenses._teacher import TeacherSlot, teacher_config
from agad.objectives import base, defaults

NAME = "atat"
VARIANTS = ("paper", "code_cifar10", "code_cifar100", "logit_mse", "cam_mse")
CODE_VARIANTS = ("code_cifar10", "code_cifar100")
LOSSES = {
  "paper": "paper",
  "code_cifar10": "logit_mse",
  "logit_mse": "logit_mse",
  "code_cifar100": "cam_mse",
  "cam_mse": "cam_mse",
}  # variant -> the loss it optimises
CAM_NORMS = ("auto", "minmax", "none")
CAM_SCALES = ("auto", "per_example", "code")
STARTS = ("auto", "code", "teacher")
STUDENT_RELU = ("auto", "yes", "no")

# Fields and their comments stay aligned (the defaults are their own documentation).
# fmt: off
DEFAULTS = ml_collections.ConfigDict()
DEFAULTS.variant = "paper"         # paper (Eq. 5-7) | code_cifar10 / code_cifar100 (the official files) |
                                   # logit_mse / cam_mse (their losses, student from the teacher, per-example maps).
DEFAULTS.teacher = ml_collections.ConfigDict()  # the frozen teacher run (TeacherSlot), fields below
DEFAULTS.teacher.workdir = ""      # train_tsf.py:110 restores models/naturally_trained (a `standard` run; required).
DEFAULTS.teacher.step = "latest"   # the code's checkpoint-70000 = Madry's final natural checkpoint (= init.step's default).
DEFAULTS.sites = ("features",)     # paper Eq. 5 sum over layers J, "the topmost convolution layer" (Sec. 3.2);
                                   # code: the final BN-ReLU map (model.py:85-88 `unit_last`) = agad's `features`.
DEFAULTS.lam_at = 1.0              # paper lambda_1, unstated (ablation weights 1/0, Sec. 4.3); code_cifar100:
                                   # loss_gp1 + loss_gp2 with weight 1 (cifar100/model1.py:131).
DEFAULTS.lam_lp = 1.0              # paper lambda_2, unstated; code_cifar10: loss_lp1 + loss_lp2, written weight 0.5
                                   # cancelled by Reduction.MEAN (cifar10/model.py:139-142): effective 1.
DEFAULTS.cam_norm = "auto"         # auto: minmax for paper (per example), none otherwise (the code's raw maps).
DEFAULTS.cam_scale = "auto"        # auto: code for code_*, per_example otherwise. per_example: d z[b, y_b]/dA;
                                   # code: x 1/(N K) of tf.gradients(reduce_mean(z*onehot)) (cifar100/model1.py:103-107),
                                   # N = B teacher, 2B student.
DEFAULTS.student_relu = "auto"     # auto: no for code_cifar100 (its student map enters the loss before ReLU,
                                   # cifar100/model1.py:112-116), yes otherwise (Eq. 3). The teacher's is always ReLU'd.
DEFAULTS.student_start = "auto"    # auto: code for code_*, teacher otherwise. code: random init, lr schedule from the
                                   # teacher's restored step (train_tsf.py:109-110); teacher: init.workdir = the teacher.
DEFAULTS.steps = 7                 # config.json num_steps 7 (paper Sec. 4.1: 7 steps); None: config.attack.steps.
DEFAULTS.step_size = None          # None: config.attack.step_size (CIFAR 2/255 = config.json step_size 2.0 on 0-255).
                                   # eps is config.attack.eps (config.json epsilon 8.0 = 8/255).
DEFAULTS.random_start = "uniform"  # config.json random_start true: x + U(-eps, eps) (pgd_attack.py:46-48).
DEFAULTS.attack_bn = "batch"       # code: the train-mode graph (batch statistics; its moving averages also
                                   # update during the attack, which agad does not do). "eval": running averages.
# fmt: on


def settings(cfg) -> dict:
  """The ``auto`` / None fields of ``objective.atat`` resolved for its variant:
  ``{"cam_norm", "cam_scale", "student_relu", "student_start"}``."""
  code = cfg.variant in CODE_VARIANTS
  return {
    "cam_norm": cfg.cam_norm
    if cfg.cam_norm != "auto"
    else ("minmax" if cfg.variant == "paper" else "none"),
    "cam_scale": cfg.cam_scale if cfg.cam_scale != "auto" else ("code" if code else "per_example"),
    "student_relu": cfg.variant != "code_cifar100"
    if cfg.student_relu == "auto"
    else cfg.student_relu == "yes",
    "student_start": cfg.student_start
    if cfg.student_start != "auto"
    else ("code" if code else "teacher"),
  }


# ----------------------------------------------------------------- Grad-CAM in one pass


def _split(variables: dict) -> tuple[Any, dict]:
  return variables["params"], {
    k: v for k, v in variables.items() if k not in ("params", "perturbations", "intermediates")
  }


def grad_cam_pass(
  model,
  params,
  model_state,
  images: jax.Array,
  classes: jax.Array,
  *,
  sites: Sequence[str],
  mode: str,
  labels: jax.Array | None = None,
  rng: jax.Array | None = None,
  taps: Sequence[str] | bool = base.ALL_TAPS,
):
  """One forward pass plus one VJP: ``(ModelOutput, {site: (A, dz/dA)})``.

  ``images [N, H, W, C]`` in [0, 1], ``classes [N]`` int (the logit explained per
  example), ``sites`` site names (aliases resolved). The model runs once, in BN ``mode``
  (``"train"`` updates and returns the running statistics, like :func:`base.forward`),
  with a zero perturbation ``delta_s`` at each site (``A_s + delta_s``); the VJP of
  ``sum_n z[n, classes_n]`` w.r.t. the ``delta_s`` gives ``d z / d A_s`` for every site
  (only the layers after the sites are backpropagated). Both outputs are differentiable
  w.r.t. ``params`` (double backprop). The returned ``model_state`` carries no
  perturbations; ``taps`` as in :func:`base.forward` (the sites are always included).
  """
  resolved = [attention_model.resolve(model, s, images.shape[1:]) for s in sites]
  variables = {"params": params, **model_state}
  entries = [attention_model._site_entry(model, variables, images, s) for s in resolved]
  tap_names = taps if taps is base.ALL_TAPS else tuple(dict.fromkeys((*taps, *resolved)))

  def run(deltas):
    tree: dict = {}
    for (path, _), delta in zip(entries, deltas):
      _merge(tree, attention_model._perturbation(path, delta))
    out = base.forward(
      model,
      params,
      {**model_state, "perturbations": tree},
      images,
      mode=mode,
      labels=labels,
      taps=tap_names,
      rng=rng,
    )
    state = {k: v for k, v in out.model_state.items() if k != "perturbations"}
    return out.logits, out._replace(model_state=state)

  zeros = tuple(jnp.zeros(spec.shape, spec.dtype) for _, spec in entries)
  logits, vjp, out = jax.vjp(run, zeros, has_aux=True)
  if classes.shape != (images.shape[0],):
    raise ValueError(
      f"grad_cam_pass: classes must be [N] = [{images.shape[0]}] ints, got shape {classes.shape}"
    )
  (grads,) = vjp(jax.nn.one_hot(classes, logits.shape[-1], dtype=logits.dtype))
  return out, {s: (out.taps[s], g) for s, g in zip(resolved, grads)}


def _merge(into: dict, tree: dict) -> None:
  for k, v in tree.items():
    if isinstance(v, dict) and isinstance(into.get(k), dict):
      _merge(into[k], v)
    else:
      into[k] = v


def site_maps(
  features_and_grads: dict, *, normalize: str | None, scale: float = 1.0, relu: bool = True
) -> dict:
  """``{site: [N, h, w]}`` Grad-CAM maps from :func:`grad_cam_pass`'s ``{site: (A, g)}``:
  ``relu(sum_c mean_hw(scale * g) A)`` (paper Eq. 3; without the ReLU if ``relu=False``),
  then ``normalize`` per example (:func:`agad.attention.normalize_maps`: ``"minmax"`` or None)."""
  return {
    s: maps_lib.grad_cam_from_grads(a, scale * g, relu=relu, normalize=normalize)
    for s, (a, g) in features_and_grads.items()
  }


def attention_maps(
  model,
  params,
  model_state,
  teacher_model,
  teacher_variables,
  x,
  adv,
  y,
  *,
  sites: Sequence[str],
  cam_norm: str,
  cam_scale: str,
  student_relu: bool,
  rng: jax.Array | None = None,
):
  """``(student ModelOutput over [x; x'], teacher ModelOutput over x, student maps
  {site: [2B, h, w]}, teacher maps {site: [B, h, w]})``: the student's train-mode
  :func:`grad_cam_pass` over ``[x; x']`` and the teacher's eval-mode one over ``x``, both
  explaining the true class, turned into maps with the resolved :func:`settings`
  (``cam_scale="code"``: student x ``1/(2B K)``, teacher x ``1/(B K)``; the teacher's map is
  always ReLU'd, the student's only if ``student_relu``). The teacher's maps carry no gradient."""
  n = y.shape[0]
  both, yy = jnp.concatenate([x, adv]), jnp.concatenate([y, y])
  t_params, t_state = _split(teacher_variables)
  out, s_fg = grad_cam_pass(
    model, params, model_state, both, yy, sites=sites, mode="train", labels=yy, rng=rng
  )
  t_out, t_fg = grad_cam_pass(
    teacher_model, t_params, t_state, x, y, sites=sites, mode="eval", labels=y, taps=()
  )
  k = out.logits.shape[-1]
  code = cam_scale == "code"
  normalize = None if cam_norm == "none" else cam_norm
  student = site_maps(
    s_fg, normalize=normalize, scale=1.0 / (2 * n * k) if code else 1.0, relu=student_relu
  )
  teacher = site_maps(t_fg, normalize=normalize, scale=1.0 / (n * k) if code else 1.0, relu=True)
  return out, t_out, student, jax.lax.stop_gradient(teacher)


# ----------------------------------------------------------------- the loss


def l2_rows(a: jax.Array, b: jax.Array) -> jax.Array:
  """``||v(a_n) - v(b_n)||_2`` per example ``[N]`` for ``a, b [N, ...]``; gradient 0 (not
  NaN) where the two are equal."""
  if a.shape != b.shape:
    raise ValueError(
      f"l2_rows: shapes {a.shape} and {b.shape} differ: compare maps of one site and "
      "logits of one model family"
    )
  d = (a.astype(jnp.float32) - b.astype(jnp.float32)).reshape(a.shape[0], -1)
  sq = jnp.sum(d * d, axis=-1)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def atat_loss(
  variant: str,
  logits: jax.Array,
  labels: jax.Array,
  *,
  student_maps: dict | None = None,
  teacher_maps: dict | None = None,
  teacher_logits: jax.Array | None = None,
  lam_at: float = 1.0,
  lam_lp: float = 1.0,
) -> tuple[jax.Array, dict]:
  """The ATAT objective of ``variant`` on precomputed passes: ``(scalar, metrics)``.

  logits: the student's ``[2B, K]`` over ``[x; x']``; labels ``[B]``.
  student_maps: ``{site: [2B, h, w]}`` (``paper``, ``code_cifar100``, ``cam_mse``), rows as logits.
  teacher_maps: ``{site: [B, h, w]}`` of the teacher on clean x (same sites).
  teacher_logits: ``[B, K]`` of the teacher on clean x (``code_cifar10``, ``logit_mse``).
  Maps arrive normalised/scaled as the variant wants (see the module doc); the teacher's
  inputs are gradient-stopped here.

  ``paper``:  mean CE + lam_at sum_s mean_b(||T_s - S_s(x')||_2 + ||T_s - S_s(x)||_2)
              + lam_lp mean_b ||z(x) - z(x')||_2
  ``code_cifar10``, ``logit_mse``:  mean CE + lam_lp (mean (z(x) - z_T)^2 + mean (z(x') - z_T)^2)
  ``code_cifar100``, ``cam_mse``: mean CE + lam_at sum_s (mean (S_s(x) - T_s)^2 + mean (S_s(x') - T_s)^2)
  """
  if variant not in VARIANTS:
    raise ValueError(f"ATAT variant {variant!r} is not one of {VARIANTS}")
  kind = LOSSES[variant]
  n = labels.shape[0]
  if logits.shape[0] != 2 * n:
    raise ValueError(f"atat_loss: logits {logits.shape} must hold [x; x'] = 2 x {n} rows")
  logits = logits.astype(jnp.float32)
  clean, adv = logits[:n], logits[n:]
  ce = base.cross_entropy_mean(logits, jnp.concatenate([labels, labels]))
  zero = jnp.zeros((), jnp.float32)
  att, lp = zero, zero
  if kind in ("paper", "cam_mse"):
    if not student_maps or set(student_maps) != set(teacher_maps or {}):
      raise ValueError(
        f"atat_loss({variant!r}) needs student_maps and teacher_maps at the same sites, got "
        f"{sorted(student_maps or {})} and {sorted(teacher_maps or {})}"
      )
    for s, maps in student_maps.items():
      t = jax.lax.stop_gradient(teacher_maps[s]).astype(jnp.float32)
      s_clean, s_adv = maps[:n], maps[n:]
      if kind == "paper":
        att = att + jnp.mean(l2_rows(t, s_adv) + l2_rows(t, s_clean))
      else:
        att = att + jnp.mean(jnp.square(s_clean - t)) + jnp.mean(jnp.square(s_adv - t))
  if kind == "paper":
    lp = jnp.mean(l2_rows(clean, adv))
  elif kind == "logit_mse":
    if teacher_logits is None:
      raise ValueError(f"atat_loss({variant!r}) needs teacher_logits [B, K]")
    t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
    lp = jnp.mean(jnp.square(clean - t)) + jnp.mean(jnp.square(adv - t))
  value = ce + lam_at * att + lam_lp * lp
  return value, {"atat_ce": ce, "atat_attention": att, "atat_logit": lp}


# ----------------------------------------------------------------- config and teacher


def _config(config) -> ml_collections.ConfigDict:
  cfg = defaults.objective_config(config, NAME, DEFAULTS)
  if cfg.variant not in VARIANTS:
    raise ValueError(
      f"objective.atat.variant = {cfg.variant!r} is not one of {VARIANTS} "
      "(paper: Eq. 5-7; code_cifar10 / code_cifar100: the official files; logit_mse / "
      "cam_mse: their losses with the student from its teacher)"
    )
  if cfg.cam_norm not in CAM_NORMS:
    raise ValueError(f"objective.atat.cam_norm = {cfg.cam_norm!r} is not one of {CAM_NORMS}")
  if cfg.cam_scale not in CAM_SCALES:
    raise ValueError(f"objective.atat.cam_scale = {cfg.cam_scale!r} is not one of {CAM_SCALES}")
  if cfg.student_start not in STARTS:
    raise ValueError(f"objective.atat.student_start = {cfg.student_start!r} is not one of {STARTS}")
  if cfg.student_relu not in STUDENT_RELU:
    raise ValueError(
      f"objective.atat.student_relu = {cfg.student_relu!r} is not one of {STUDENT_RELU}"
    )
  sites = (cfg.sites,) if isinstance(cfg.sites, str) else tuple(cfg.sites)
  if LOSSES[cfg.variant] != "logit_mse" and not sites:
    raise ValueError(
      f"objective.atat.sites = {cfg.sites!r} is empty: variant {cfg.variant!r} transfers "
      "Grad-CAM maps; set e.g. sites=('features',)"
    )
  if cfg.steps is not None and int(cfg.steps) < 1:
    raise ValueError(f"objective.atat.steps = {cfg.steps!r} must be >= 1 or None (official 7)")
  for name in ("lam_at", "lam_lp"):
    if float(cfg[name]) < 0:
      raise ValueError(f"objective.atat.{name} = {cfg[name]!r} must be >= 0 (paper: 1)")
  return cfg


def _frozen_fn(cfg, config, slot: TeacherSlot):
  """``frozen(splits) -> ({"teacher": variables}, record)``; ``record`` holds
  ``{"teacher": {workdir, step, params_hash}}`` and, where the student starts as the code
  does (``student_start="code"``), ``"schedule_start_step"``: the teacher's step, at which
  the trainer starts the learning-rate schedule (the code's restored ``global_step``)."""
  start = settings(cfg)["student_start"]

  def frozen(splits):
    workdir = cfg.teacher.workdir
    field = f"config.objective.{NAME}.teacher.workdir"
    if start == "code" and config.init.workdir:
      raise ValueError(
        f"objective.atat.student_start resolves to 'code' (variant {cfg.variant!r}: the official "
        f"train_tsf.py starts the student from random init and restores only the teacher) but "
        f"init.workdir = {config.init.workdir!r}: drop --config.init.workdir, or set "
        "--config.objective.atat.student_start=teacher (the paper's start; variants logit_mse / cam_mse)"
      )
    teacher_cfg = teacher_config(
      workdir,
      config,
      defense="ATAT",
      field=field,
      empty_hint=(
        "a finished natural run of the student's dataset and model (e.g. launch.train "
        f"--config=...:MODEL,standard), then --{field[len('config.') :]}=THAT_WORKDIR"
        + (" --config.init.workdir=THAT_WORKDIR" if start == "teacher" else "")
      ),
      start_note="the paper starts the student from its teacher (Sec. 3.2)",
      from_teacher=start == "teacher",
    )
    std = teacher_cfg.get("objective", {}).get("standard", {})
    if teacher_cfg.objective.name != "standard" or float(std.get("label_smoothing", 0.0)) != 0.0:
      logging.warning(
        "ATAT teacher %s is %r with label smoothing %s; the paper's and the code's teacher "
        "is naturally trained (standard, no smoothing)",
        workdir,
        teacher_cfg.objective.name,
        std.get("label_smoothing"),
      )
    tree, record = slot.frozen(splits)
    if start == "code":
      record = {**record, "schedule_start_step": int(record["teacher"]["step"])}
    return tree, record

  return frozen


# ----------------------------------------------------------------- the objective


def atat(model, config) -> base.Objective:
  """ATAT (module doc); ``generate`` returns x' ``[B, H, W, C]``, the loss's passes are
  ``"clean"`` and ``"adv"`` (the halves of its one train-mode pass over [x; x'])."""
  cfg = _config(config)
  variant = cfg.variant
  attack = defaults.TrainingAttack(model, config, cfg)
  if cfg.steps is not None:
    attack.steps = int(cfg.steps)
  step_size = None if cfg.step_size is None else float(cfg.step_size)
  slot = TeacherSlot(cfg.teacher.workdir, cfg.teacher.step)
  sites = (cfg.sites,) if isinstance(cfg.sites, str) else tuple(cfg.sites)
  resolved = settings(cfg)
  map_kw = {k: resolved[k] for k in ("cam_norm", "cam_scale", "student_relu")}
  lam_at, lam_lp = float(cfg.lam_at), float(cfg.lam_lp)
  uses_maps = LOSSES[variant] != "logit_mse"

  def generate(params, model_state, aux_state, batch, key, step):
    del aux_state
    return attack(
      params,
      model_state,
      batch["image"],
      batch["label"],
      key,
      loss="ce",
      step=step,
      step_size=step_size,
    )

  def loss(params, model_state, aux_state, batch, adv, key, step):
    del step
    x, y = batch["image"], batch["label"]
    n = y.shape[0]
    teacher = aux_state[base.FROZEN]["teacher"]
    rng = base.pass_key(key, 0)
    student_maps = teacher_maps = None
    if uses_maps:
      out, t_out, student_maps, teacher_maps = attention_maps(
        model, params, model_state, slot.model, teacher, x, adv, y, sites=sites, rng=rng, **map_kw
      )
    else:
      yy = jnp.concatenate([y, y])
      out = base.forward(
        model,
        params,
        model_state,
        jnp.concatenate([x, adv]),
        mode="train",
        labels=yy,
        taps=base.ALL_TAPS,
        rng=rng,
      )
      t_out = slot.apply(teacher, x, labels=y)
    t_logits = jax.lax.stop_gradient(t_out.logits)
    value, metrics = atat_loss(
      variant,
      out.logits,
      y,
      student_maps=student_maps,
      teacher_maps=teacher_maps,
      teacher_logits=t_logits,
      lam_at=lam_at,
      lam_lp=lam_lp,
    )
    metrics.update(
      {
        "accuracy": base.accuracy(out.logits[:n], y),
        "adv_accuracy": base.accuracy(out.logits[n:], y),
        "atat_teacher_accuracy": base.accuracy(t_logits, y),
      }
    )
    passes = {"clean": base.slice_output(out, 0, n), "adv": base.slice_output(out, n, 2 * n)}
    return value, base.LossAux(out.model_state, aux_state, metrics, passes)

  return base.Objective(
    NAME,
    base.no_aux_state,
    generate,
    loss,
    base.BNPolicy(attack=attack.bn, update="clean+adversarial (one concatenated pass)"),
    adaptive_loss=None,
    frozen=_frozen_fn(cfg, config, slot),
  )


def recipe(c, *, dataset: str, model: str, spec: str, smoke: bool) -> None:
  """``wrn34_10,atat`` on CIFAR-10 and CIFAR-100: the code's recipe,
  lizhuorong/Adversarial-Robustness-via-Attention-Transfer cifar10/config.json
  (training_batch_size 32, max_num_training_steps 400000, step_size_schedule
  [[0, 0.1], [40000, 0.01], [60000, 0.001]], weight_decay 2e-4, momentum 0.9) and
  model.py:43 (tf.image.per_image_standardization); CIFAR-100 takes it too (the paper's "same
  hyper-parameters as we did on CIFAR-10", Sec. 5). The attack is the CIFAR configs' eps
  8/255, step 2/255, uniform start with ATAT's own 7 steps. ``smoke`` keeps its schedule."""
  if dataset not in ("cifar10", "cifar100") or (model, spec) != ("wrn34_10", "atat"):
    return
  c.batch_size = 32
  c.model.input_norm = "per_image"
  c.optim.weight_decay = 2e-4
  if not smoke:
    steps_per_epoch = (50_000 - c.data.val_size) // c.batch_size  # 1531
    c.num_epochs = round(400_000 / steps_per_epoch)  # 261 epochs = 399,591 steps (an int field)
    c.optim.boundaries = (40_000 / steps_per_epoch, 60_000 / steps_per_epoch)


def objective(model, config) -> base.Objective:
  """The standalone ``atat`` objective of the config grammar (the defense contract)."""
  return atat(model, config)
