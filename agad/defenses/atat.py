"""ATAT: attention-transfer adversarial training (Li, Feng, Wu, Yu, Zheng, "Adversarial
Robustness via Attention Transfer"), with the official code
lizhuorong/Adversarial-Robustness-via-Attention-Transfer @652c02e (TF 1.4, a fork of
MadryLab/cifar10_challenge: ``cifar10/{train_tsf,model,model1,pgd_attack,eval_tsf}.py``;
in ``cifar100/`` the roles of ``model.py`` and ``model1.py`` are swapped).

Teacher: a naturally trained run (a ``standard`` run; the code restores Madry's
``models/naturally_trained/checkpoint-70000``, train_tsf.py:110), frozen, eval mode
(``Model1(mode='eval')``, train_tsf.py:44), clean inputs; loaded by ``Objective.frozen``
from ``objective.atat.teacher.{workdir, step}`` and checked against the student's config
(dataset, classes, image shape, model, input normalisation) before training. The student
has the teacher's architecture and starts from its weights (paper Sec. 3.2: "initialized
with the same parameters as the original network"; the code restores only the teacher's
variables, train_tsf.py:61-65, 90, 110): pass ``--config.init.workdir=<the teacher's
workdir>`` (a warning names the mismatch otherwise). Two commands (WORKSPACE.md):

    python -m launch.train --config=configs/fashion_mnist.py:smallcnn,standard --workdir=runs/atat_teacher
    python -m launch.train --config=configs/fashion_mnist.py:smallcnn,atat \\
        --config.objective.atat.teacher.workdir=runs/atat_teacher \\
        --config.init.workdir=runs/atat_teacher --workdir=runs/atat

Per batch ``(x, y)`` of ``B`` examples: ``x' = PGD(x, y)`` (CE, uniform start, 7 steps,
pgd_attack.py:43-58 with config.json ``num_steps 7, step_size 2.0, epsilon 8.0`` on 0-255;
paper Sec. 4.1), then **one train-mode pass of the student over [x; x']** (one BN batch of
2B images; train_tsf.py:124, 160-161, 176) and the teacher's eval-mode pass over x.

Grad-CAM (paper Eq. 3; the code's ``costs`` scope, cifar10/model.py:106-120): at a site
with value ``A [N, H, W, C]`` and class logits ``z``,

    ATT(x)[b] = relu(sum_c mean_hw(d z[b, y_b] / d A[b, :, :, c]) A[b, :, :, c])   [N, H, W]

with the **true** class ``y`` (paper Sec. 3: "gradients provided by the true label"; the
code's ``one_hot(y_input)``). The student's maps come from its training pass itself: the
site gets a zero perturbation ``delta`` (``agad.models.layers.site``), and one VJP of
``sum_b z[b, y_b]`` w.r.t. ``delta`` gives ``d z / d A`` at every site at once
(:func:`grad_cam_pass`). That VJP is a function of the weights, so the loss trains through
the student's Grad-CAM by double backprop (the code's ``tf.gradients`` inside the loss).
In train mode the VJP runs through batch-statistics BatchNorm: it is each example's own
gradient only where no BN follows the site, which holds at ``features`` (the default, the
code's last feature map: WRN's final BN-ReLU, ``unit_last``) and ``embedding`` of every
agad backbone; at earlier sites the gradient also carries the batch statistics' terms,
as in the code's train-mode graph.

Variants (``objective.atat.variant``; every run records it in its config):

``paper`` (default; Eq. 5-7, per example, averaged over the batch like the CE):

    L = mean_{2B} CE([z_S(x); z_S(x')], [y; y])
      + lam_at sum_{sites} mean_b ( ||v(T(x)_b) - v(S(x')_b)||_2 + ||v(T(x)_b) - v(S(x)_b)||_2 )
      + lam_lp mean_b ||z_S(x)_b - z_S(x')_b||_2

  ``T``/``S`` the teacher's/student's Grad-CAM, each map min-max normalised per example
  (``cam_norm``; Eq. 3 itself has no normalisation: without it the distance compares the
  maps' scales, which differ between a natural teacher and a robust student, as much as
  their shapes); the norms are plain (not squared) L2 norms of the vectorised maps, p = 2
  (Sec. 3.2), one per example, averaged over the batch (Eq. 4-6 are written for one
  example; Eq. 7 adds them to the batch-mean CE). The paper leaves lam_1 and lam_2 open;
  its ablation switches terms with weights 1/0 (Sec. 4.3), so both default to 1.
``code_cifar10`` (cifar10/model.py:125-142, train_tsf.py:140, 161; **no attention term**):

    L = mean_{2B} CE + lam_lp [ mean_{B,K} (z_S(x) - z_T(x))^2 + mean_{B,K} (z_S(x') - z_T(x))^2 ]

  ``tf.losses.mean_squared_error(weights=0.5, reduction=MEAN)`` divides the weighted sum
  by the sum of the weights, so the written 0.5 cancels: lam_lp = 1.
``code_cifar100`` (cifar100/model1.py:100-131, train_tsf.py:146, 174; no logit term):

    L = mean_{2B} CE + lam_at sum_{sites} [ mean_{B,H,W} (S(x) - T(x))^2 + mean_{B,H,W} (S(x') - T(x))^2 ]

  on unnormalised maps. The code's "CAM" is computed with the Grad-CAM formula
  (``tf.gradients``), so it is defined on every backbone, SmallCNN's flatten + MLP head
  included; on GAP + linear heads (ResNet/WRN ``features``) it equals
  ``relu(CAM_Zhou) / HW``. The code differentiates ``reduce_mean(z * onehot(y))`` over
  the whole graph batch, so its maps carry a factor ``1 / (N K)`` with ``N = B`` for the
  teacher but ``N = 2B`` for the student (which must then grow its maps to twice the
  teacher's); ``cam_scale="code"`` reproduces that, the default ``"per_example"`` leaves
  each example's gradient of its own logit unscaled.

Training attack: PGD-7 (``steps``, ATAT's own override of ``config.attack.steps``),
uniform start, CE, eps and step size from ``config.attack`` (CIFAR: 8/255 and 2/255, the
code's 8 and 2 on 0-255). The code attacks the train-mode graph, whose BN moving averages
update on every attack step (``updates_collections=None``); agad attacks with batch
statistics and leaves the running averages alone (``attack_bn="batch"``).

Evaluation: the deployed model is the plain backbone (no test-time module), so
``adaptive_loss`` is None: CE on the logits already is the white-box attack. The official
evaluation builds the model with ``mode='train'`` (cifar10/eval_tsf.py:48), i.e. BN uses
each 100-image test batch's statistics; agad always evaluates with running averages
(eval mode). The paper reports no AutoAttack (only loss-landscape plots against gradient
masking), so ATAT runs must be evaluated with ``table_aa``.
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
VARIANTS = ("paper", "code_cifar10", "code_cifar100")
CAM_NORMS = ("auto", "minmax", "none")
CAM_SCALES = ("per_example", "code")

DEFAULTS = ml_collections.ConfigDict()
DEFAULTS.variant = "paper"         # paper (Eq. 5-7) | code_cifar10 (logit MSE to the teacher) | code_cifar100 (CAM MSE).
DEFAULTS.teacher = ml_collections.ConfigDict()  # the frozen teacher run (TeacherSlot), fields below
DEFAULTS.teacher.workdir = ""      # train_tsf.py:110 restores models/naturally_trained (a `standard` run; required).
DEFAULTS.teacher.step = "latest"   # the code's checkpoint-70000 = Madry's final natural checkpoint (= init.step's default).
DEFAULTS.sites = ("features",)     # paper Eq. 5 sum over layers J, "the topmost convolution layer" (Sec. 3.2);
                                   # code: the final BN-ReLU map (model.py:85-88 `unit_last`) = agad's `features`.
DEFAULTS.lam_at = 1.0              # paper lambda_1, unstated (ablation weights 1/0, Sec. 4.3); code_cifar100:
                                   # loss_gp1 + loss_gp2 with weight 1 (cifar100/model1.py:131).
DEFAULTS.lam_lp = 1.0              # paper lambda_2, unstated; code_cifar10: loss_lp1 + loss_lp2, written weight 0.5
                                   # cancelled by Reduction.MEAN (cifar10/model.py:139-142): effective 1.
DEFAULTS.cam_norm = "auto"         # auto: minmax for paper (per example), none for code_cifar100 (the code's raw maps).
DEFAULTS.cam_scale = "per_example"  # per_example: d z[b, y_b]/dA; code: x 1/(N K) of tf.gradients(reduce_mean(z*onehot))
                                   # (cifar10/model.py:108-114), N = B teacher, 2B student.
DEFAULTS.steps = 7                 # config.json num_steps 7 (paper Sec. 4.1: 7 steps); None: config.attack.steps.
DEFAULTS.step_size = None          # None: config.attack.step_size (CIFAR 2/255 = config.json step_size 2.0 on 0-255).
                                   # eps is config.attack.eps (config.json epsilon 8.0 = 8/255).
DEFAULTS.random_start = "uniform"  # config.json random_start true: x + U(-eps, eps) (pgd_attack.py:46-48).
DEFAULTS.attack_bn = "batch"       # code: the train-mode graph (batch statistics; its moving averages also
                                   # update during the attack, which agad does not do). "eval": running averages.


# ----------------------------------------------------------------- Grad-CAM in one pass


def _split(variables: dict) -> tuple[Any, dict]:
  return variables["params"], {k: v for k, v in variables.items()
                               if k not in ("params", "perturbations", "intermediates")}


def grad_cam_pass(model, params, model_state, images: jax.Array, classes: jax.Array, *,
                  sites: Sequence[str], mode: str, labels: jax.Array | None = None,
                  rng: jax.Array | None = None, taps: Sequence[str] | bool = base.ALL_TAPS):
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
    out = base.forward(model, params, {**model_state, "perturbations": tree}, images, mode=mode,
                       labels=labels, taps=tap_names, rng=rng)
    state = {k: v for k, v in out.model_state.items() if k != "perturbations"}
    return out.logits, out._replace(model_state=state)

  zeros = tuple(jnp.zeros(spec.shape, spec.dtype) for _, spec in entries)
  logits, vjp, out = jax.vjp(run, zeros, has_aux=True)
  if classes.shape != (images.shape[0],):
    raise ValueError(f"grad_cam_pass: classes must be [N] = [{images.shape[0]}] ints, got shape "
                     f"{classes.shape}")
  (grads,) = vjp(jax.nn.one_hot(classes, logits.shape[-1], dtype=logits.dtype))
  return out, {s: (out.taps[s], g) for s, g in zip(resolved, grads)}


def _merge(into: dict, tree: dict) -> None:
  for k, v in tree.items():
    if isinstance(v, dict) and isinstance(into.get(k), dict):
      _merge(into[k], v)
    else:
      into[k] = v


def site_maps(features_and_grads: dict, *, normalize: str | None, scale: float = 1.0) -> dict:
  """``{site: [N, h, w]}`` Grad-CAM maps from :func:`grad_cam_pass`'s ``{site: (A, g)}``:
  ``relu(sum_c mean_hw(scale * g) A)`` (paper Eq. 3), then ``normalize`` per example
  (:func:`agad.attention.normalize_maps`: ``"minmax"`` or None)."""
  return {s: maps_lib.grad_cam_from_grads(a, scale * g, relu=True, normalize=normalize)
          for s, (a, g) in features_and_grads.items()}


# ----------------------------------------------------------------- the loss


def l2_rows(a: jax.Array, b: jax.Array) -> jax.Array:
  """``||v(a_n) - v(b_n)||_2`` per example ``[N]`` for ``a, b [N, ...]``; gradient 0 (not
  NaN) where the two are equal."""
  if a.shape != b.shape:
    raise ValueError(f"l2_rows: shapes {a.shape} and {b.shape} differ: compare maps of one site and "
                     "logits of one model family")
  d = (a.astype(jnp.float32) - b.astype(jnp.float32)).reshape(a.shape[0], -1)
  sq = jnp.sum(d * d, axis=-1)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def atat_loss(variant: str, logits: jax.Array, labels: jax.Array, *,
              student_maps: dict | None = None, teacher_maps: dict | None = None,
              teacher_logits: jax.Array | None = None, lam_at: float = 1.0,
              lam_lp: float = 1.0) -> tuple[jax.Array, dict]:
  """The ATAT objective of ``variant`` on precomputed passes: ``(scalar, metrics)``.

  logits: the student's ``[2B, K]`` over ``[x; x']``; labels ``[B]``.
  student_maps: ``{site: [2B, h, w]}`` (``paper``, ``code_cifar100``), rows as logits.
  teacher_maps: ``{site: [B, h, w]}`` of the teacher on clean x (same sites).
  teacher_logits: ``[B, K]`` of the teacher on clean x (``code_cifar10``).
  Maps arrive normalised/scaled as the variant wants (see the module doc); the teacher's
  inputs are gradient-stopped here.

  ``paper``:  mean CE + lam_at sum_s mean_b(||T_s - S_s(x')||_2 + ||T_s - S_s(x)||_2)
              + lam_lp mean_b ||z(x) - z(x')||_2
  ``code_cifar10``:  mean CE + lam_lp (mean (z(x) - z_T)^2 + mean (z(x') - z_T)^2)
  ``code_cifar100``: mean CE + lam_at sum_s (mean (S_s(x) - T_s)^2 + mean (S_s(x') - T_s)^2)
  """
  if variant not in VARIANTS:
    raise ValueError(f"ATAT variant {variant!r} is not one of {VARIANTS}")
  n = labels.shape[0]
  if logits.shape[0] != 2 * n:
    raise ValueError(f"atat_loss: logits {logits.shape} must hold [x; x'] = 2 x {n} rows")
  logits = logits.astype(jnp.float32)
  clean, adv = logits[:n], logits[n:]
  ce = base.cross_entropy_mean(logits, jnp.concatenate([labels, labels]))
  zero = jnp.zeros((), jnp.float32)
  att, lp = zero, zero
  if variant in ("paper", "code_cifar100"):
    if not student_maps or set(student_maps) != set(teacher_maps or {}):
      raise ValueError(f"atat_loss({variant!r}) needs student_maps and teacher_maps at the same sites, got "
                       f"{sorted(student_maps or {})} and {sorted(teacher_maps or {})}")
    for s, maps in student_maps.items():
      t = jax.lax.stop_gradient(teacher_maps[s]).astype(jnp.float32)
      s_clean, s_adv = maps[:n], maps[n:]
      if variant == "paper":
        att = att + jnp.mean(l2_rows(t, s_adv) + l2_rows(t, s_clean))
      else:
        att = att + jnp.mean(jnp.square(s_clean - t)) + jnp.mean(jnp.square(s_adv - t))
  if variant == "paper":
    lp = jnp.mean(l2_rows(clean, adv))
  elif variant == "code_cifar10":
    if teacher_logits is None:
      raise ValueError("atat_loss('code_cifar10') needs teacher_logits [B, K]")
    t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
    lp = jnp.mean(jnp.square(clean - t)) + jnp.mean(jnp.square(adv - t))
  value = ce + lam_at * att + lam_lp * lp
  return value, {"atat_ce": ce, "atat_attention": att, "atat_logit": lp}


# ----------------------------------------------------------------- config and teacher


def _config(config) -> ml_collections.ConfigDict:
  cfg = defaults.objective_config(config, NAME, DEFAULTS)
  if cfg.variant not in VARIANTS:
    raise ValueError(f"objective.atat.variant = {cfg.variant!r} is not one of {VARIANTS} "
                     "(paper: Eq. 5-7; code_cifar10 / code_cifar100: the official files)")
  if cfg.cam_norm not in CAM_NORMS:
    raise ValueError(f"objective.atat.cam_norm = {cfg.cam_norm!r} is not one of {CAM_NORMS}")
  if cfg.cam_scale not in CAM_SCALES:
    raise ValueError(f"objective.atat.cam_scale = {cfg.cam_scale!r} is not one of {CAM_SCALES}")
  sites = (cfg.sites,) if isinstance(cfg.sites, str) else tuple(cfg.sites)
  if cfg.variant != "code_cifar10" and not sites:
    raise ValueError(f"objective.atat.sites = {cfg.sites!r} is empty: variant {cfg.variant!r} transfers "
                     "Grad-CAM maps; set e.g. sites=('features',)")
  if cfg.steps is not None and int(cfg.steps) < 1:
    raise ValueError(f"objective.atat.steps = {cfg.steps!r} must be >= 1 or None (official 7)")
  for name in ("lam_at", "lam_lp"):
    if float(cfg[name]) < 0:
      raise ValueError(f"objective.atat.{name} = {cfg[name]!r} must be >= 0 (paper: 1)")
  return cfg


def _frozen_fn(cfg, config, slot: TeacherSlot):
  """``frozen(splits) -> ({"teacher": variables}, {"teacher": {workdir, step, params_hash}})``."""

  def frozen(splits):
    workdir = cfg.teacher.workdir
    field = f"config.objective.{NAME}.teacher.workdir"
    teacher_cfg = teacher_config(
        workdir, config, defense="ATAT", field=field,
        empty_hint=("a finished natural run of the student's dataset and model (e.g. launch.train "
                    f"--config=...:MODEL,standard), then --{field[len('config.'):]}=THAT_WORKDIR "
                    "--config.init.workdir=THAT_WORKDIR"),
        start_note="the paper starts the student from its teacher (Sec. 3.2)")
    std = teacher_cfg.get("objective", {}).get("standard", {})
    if teacher_cfg.objective.name != "standard" or float(std.get("label_smoothing", 0.0)) != 0.0:
      logging.warning("ATAT teacher %s is %r with label smoothing %s; the paper's and the code's teacher "
                      "is naturally trained (standard, no smoothing)", workdir, teacher_cfg.objective.name,
                      std.get("label_smoothing"))
    return slot.frozen(splits)

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
  norm = cfg.cam_norm if cfg.cam_norm != "auto" else ("minmax" if variant == "paper" else "none")
  normalize = None if norm == "none" else norm
  code_scale = cfg.cam_scale == "code"
  lam_at, lam_lp = float(cfg.lam_at), float(cfg.lam_lp)
  uses_maps = variant in ("paper", "code_cifar100")

  def generate(params, model_state, aux_state, batch, key, step):
    del aux_state
    return attack(params, model_state, batch["image"], batch["label"], key, loss="ce", step=step,
                  step_size=step_size)

  def loss(params, model_state, aux_state, batch, adv, key, step):
    del step
    x, y = batch["image"], batch["label"]
    n = y.shape[0]
    both, yy = jnp.concatenate([x, adv]), jnp.concatenate([y, y])
    teacher = aux_state[base.FROZEN]["teacher"]
    t_params, t_state = _split(teacher)
    rng = base.pass_key(key, 0)
    student_maps = teacher_maps = None
    if uses_maps:
      out, s_fg = grad_cam_pass(model, params, model_state, both, yy, sites=sites, mode="train",
                                labels=yy, rng=rng)
      t_out, t_fg = grad_cam_pass(slot.model, t_params, t_state, x, y, sites=sites, mode="eval",
                                  labels=y, taps=())
      k = out.logits.shape[-1]
      student_maps = site_maps(s_fg, normalize=normalize, scale=1.0 / (2 * n * k) if code_scale else 1.0)
      teacher_maps = site_maps(t_fg, normalize=normalize, scale=1.0 / (n * k) if code_scale else 1.0)
      teacher_maps = jax.lax.stop_gradient(teacher_maps)
    else:
      out = base.forward(model, params, model_state, both, mode="train", labels=yy, taps=base.ALL_TAPS,
                         rng=rng)
      t_out = slot.apply(teacher, x, labels=y)
    t_logits = jax.lax.stop_gradient(t_out.logits)
    value, metrics = atat_loss(variant, out.logits, y, student_maps=student_maps, teacher_maps=teacher_maps,
                               teacher_logits=t_logits, lam_at=lam_at, lam_lp=lam_lp)
    metrics.update({"accuracy": base.accuracy(out.logits[:n], y),
                    "adv_accuracy": base.accuracy(out.logits[n:], y),
                    "atat_teacher_accuracy": base.accuracy(t_logits, y)})
    passes = {"clean": base.slice_output(out, 0, n), "adv": base.slice_output(out, n, 2 * n)}
    return value, base.LossAux(out.model_state, aux_state, metrics, passes)

  return base.Objective(NAME, base.no_aux_state, generate, loss,
                        base.BNPolicy(attack=attack.bn, update="clean+adversarial (one concatenated pass)"),
                        adaptive_loss=None, frozen=_frozen_fn(cfg, config, slot))


def objective(model, config) -> base.Objective:
  """The standalone ``atat`` objective of the config grammar (the defense contract)."""
  return atat(model, config)
