"""AGKD-BML (Wang et al., ICCV 2021), as coded in hongw579/AGKD-BML @f51fca4 (``main.py``,
``utils.py``, ``argument.py``, ``custom_models/model.py``).

Teacher: a naturally trained run (``standard`` with label smoothing 0.5 over the other
classes; the code's ``natural-training-lbs05-100150`` checkpoint), frozen, eval mode,
clean inputs, loaded by ``Objective.frozen`` (``objective.agkd_bml.teacher.{workdir,
step}``). The student starts from it (``argument.py --nat_init``, default True; the paper
does not say so): pass ``--config.init.workdir=<the teacher's workdir>``.

Per batch (``main.py train``, paper Alg. 1), with ``B`` examples ``(x, y)``:

    y_mc = argmax_{j != y} f_S(x)_j               eval mode (utils.py MC_labels; Eq. 5)
    x_a  = PGD_targeted(x -> y_mc)                 forward AE (Attacks.targeted_MC)
    x_n  = a random augmented training image of class y_mc   (i_class_idx.get_batch)
    x_n' = PGD_targeted(x_n -> y)                  backward AE (perturb_PGD(targeted=True))
    one train-mode pass of the student over [x_a; x; x_n']   (3B images; BN: see below)
    the teacher, eval mode, over [x; x_n]

Both attacks descend the summed CE towards their target from a uniform start, in eval
mode, with the code's ``num_steps = 10``. The code feeds [-1, 1] inputs
(``Normalize(0.5, 0.5)``), so its ``epsilon = 8/255*2 = 16/255`` and ``step_size =
2/255*2 = 4/255`` are, in agad's [0, 1] pixels, **eps = 8/255 and step 2/255** (agad
attacks in pixel space; ``config.model.input_norm = "dataset"`` with ``config.model.mean
= std = (0.5,)*3`` gives the network the code's [-1, 1] input, main.py:286, 292). The paper trains with 2 steps (AGKD-BML) or 7 (AGKD-BML-7):
``objective.agkd_bml.steps``.

Loss as coded (``main.py`` ``train()``, after the two attacks), with ``a/c/n`` the
student's outputs on ``x_a/x/x_n'``:

    L = CE_ls(z_a, y)                                    label smoothing 0.5 over the others
      + [mart_term(z_c, z_a, y)]                         argument.py --mart default True
      + attention_l1(F_a, F_T(x)) + attention_l1(F_n, F_T(x_n))        Eq. 8, D = L1
      + 2 bml_triplet_loss(e_a, e_c, e_n, margin=0.03, lam_norm=0.001)  Eq. 6-7

``F`` = the last feature map (tap ``features``: WRN's final BN-ReLU, the code's
``feature``), ``e`` = the pooled embedding (tap ``embedding``, the code's ``x4``).
Paper vs code: the paper's Eq. 9 has no MART term (``mart_term=False``); its attention is
a channel *mean*, the code's a channel *sum* (identical after min-max normalisation); its
L_norm is a sum of L2 norms, the code's a mean of squares; lambda_1 = 2 also multiplies
lambda_2 in the code (effective 0.002). The code picks its "best" checkpoint on the *test*
set; agad selects on validation.

BatchNorm in the train pass (``objective.agkd_bml.bn``). The code wraps the student in
``torch.nn.DataParallel`` (main.py:326) over ``--gpu 0,...,7`` (argument.py:16). The
train pass (main.py:119-121) scatters [x_a; x; x_n'] along dim 0 with ``tensor.chunk(8)``:
ceil(3B/8) rows per device, the last chunk smaller, possibly fewer than 8 chunks
(:func:`chunk_sizes`). Each replica normalises its own chunk with that chunk's statistics,
and only device 0's replica shares its buffers with the module (PyTorch's DataParallel
docs: "in-place updates to the parameters or buffers on device[0] will be recorded"). So
the running mean/variance follow chunk 0 alone, the first ceil(3B/8) forward adversarial
examples x_a (48 of the 128 at the code's batch 128; chunks 2 and 5 straddle x_a/x and
x/x_n'). The attacks hold the unwrapped module (``Attacks(basic_net)`` at main.py:324,
the wrap at 326) and run in eval mode, unchunked. ``"code"``
(default) does this with ``chunks`` (default 8) in one vmapped pass
(:func:`data_parallel_forward`); ``"mixed"`` normalises and updates over the whole 3B
batch (one device; agad before this option). The running statistics drive the deployed
model, the eval-mode most-confusing labels and both training attacks.

Evaluation: the deployed model is the plain backbone, so PGD on the logits' CE is the
white-box attack. Label smoothing 0.5 masks CE gradients (the paper's Table 1: PGD-20
71.02% vs AutoAttack 37.07%), so AGKD-BML must be evaluated with ``table_aa`` (or
``full``) and the PGD-AA gap check reported. ``adaptive_loss`` adds one variant, ``mc``:
targeted CE towards the current most confusing class (the training's own forward attack,
untruncated; the scale-invariant margin attacks are C&W and AutoAttack's DLR).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections

from agad.attacks import losses as attack_losses
from agad.data import ClassBank, sample_by_class
from agad.defenses._teacher import TeacherSlot, teacher_config
from agad.objectives import base, defaults

NAME = "agkd_bml"
FEATURES, EMBEDDING = "features", "embedding"  # the code's `feature` and `x4`

# Fields and their comments stay aligned (the defaults are their own documentation).
# fmt: off
DEFAULTS = ml_collections.ConfigDict()
DEFAULTS.teacher = ml_collections.ConfigDict()  # the frozen teacher run (TeacherSlot), fields below
DEFAULTS.teacher.workdir = ""      # argument.py --nat_root: a finished `standard` run, label smoothing 0.5 (required).
DEFAULTS.teacher.step = "latest"   # argument.py --nat_file ckpt_latest.t7 (= init.step's default: same weights).
DEFAULTS.label_smoothing = 0.5     # main.py config['lb_smooth'] = 0.5 (paper Sec. 4.1, after Feature Scattering).
DEFAULTS.smoothing = "others"      # utils.py softmax_crossentropy_labelsmooth: 1 - s on y, s/(K-1) elsewhere.
DEFAULTS.mart_term = True          # argument.py --mart (store_true, default True); paper Eq. 9: off (False).
DEFAULTS.mart_beta = 6.0           # utils.py mart_loss(beta=6.0).
DEFAULTS.attention_weight = 1.0    # main.py: loss + loss_distillation_1 + loss_distillation_2 (paper Eq. 9: 1).
DEFAULTS.bml_weight = 2.0          # main.py config['lam1'] = 2 (paper lambda_1 = 2), on triplet + norm.
DEFAULTS.margin = 0.03             # main.py config['margin_A_Ap_B'] (paper m = 0.03).
DEFAULTS.lam_norm = 0.001          # main.py config['lam2'] (paper lambda_2 = 0.001; x bml_weight = 0.002).
DEFAULTS.steps = None              # None: config.attack.steps. Code: num_steps_PGD = num_steps_MC = 10;
                                   # paper: 2 (AGKD-BML) or 7 (AGKD-BML-7).
DEFAULTS.step_size = None          # None: config.attack.step_size. Code: 2/255*2 in [-1, 1] = 2/255 in [0, 1].
                                   # eps is config.attack.eps (code 8/255*2 in [-1, 1] = 8/255 in [0, 1]).
DEFAULTS.random_start = "uniform"  # main.py Attacks: random_start True, U(-eps, eps). None: config.attack.
DEFAULTS.attack_bn = "eval"        # main.py: basic_net.eval() in both attacks. None: config.attack.bn.
DEFAULTS.bn = "code"               # train-pass BN: code (DataParallel: per-chunk statistics, running
                                   # averages from chunk 0; main.py:326) | mixed (the whole 3B batch).
DEFAULTS.chunks = 8                # bn = code: devices of the DataParallel run (argument.py:16, 8 GPUs).
# fmt: on
BN_CHOICES = ("code", "mixed")


def chunk_sizes(n: int, chunks: int) -> tuple[int, ...]:
  """The rows per device when ``DataParallel`` scatters ``n`` examples over ``chunks``
  devices: ``torch.chunk`` along dim 0 (torch/csrc/cuda/comm.cpp ``scatter`` calls
  ``tensor.chunk(devices.size(), dim)``), i.e. pieces of ``ceil(n / chunks)`` rows, the
  last one smaller. When ``n`` is not a multiple of ``chunks`` there can be fewer pieces
  than devices, and DataParallel then runs only that many replicas: ``n = 10, chunks = 8``
  gives ``(2, 2, 2, 2, 2)``; ``n = 240`` (the code's last batch of an epoch, 3 x 80) gives
  eight of 30; ``n = 9, chunks = 4`` gives ``(3, 3, 3)``; ``n = 10, chunks = 4`` gives
  ``(3, 3, 3, 1)``."""
  if n < 1 or chunks < 1:
    raise ValueError(f"chunk_sizes needs n >= 1 and chunks >= 1, got n={n}, chunks={chunks}")
  size = -(-n // chunks)
  return tuple(min(size, n - start) for start in range(0, n, size))


def data_parallel_forward(
  model, params, model_state, x, *, chunks: int, labels=None, taps=(), rng=None
) -> base.ModelOutput:
  """A train-mode pass as ``torch.nn.DataParallel`` runs it on ``chunks`` devices.

  The rows of ``x [N, ...]`` are split as :func:`chunk_sizes` says. Each chunk is
  normalised by its own batch statistics, the returned running statistics are those of
  chunk 0 alone (device 0's replica), and logits, taps and aux are the chunks' results in
  row order (DataParallel's gather). The equal-sized chunks run as one ``jax.vmap``ed
  pass, a smaller last chunk as a second pass. ``chunks = 1`` is ``base.forward`` in
  ``"train"`` mode. ``labels``, ``taps``, ``rng`` as in ``base.forward``; every chunk gets
  the same ``rng``.
  """
  n = x.shape[0]
  sizes = chunk_sizes(n, int(chunks))
  size = sizes[0]
  full = n // size

  def one(xc, lc):
    return base.forward(model, params, model_state, xc, mode="train", labels=lc, taps=taps, rng=rng)

  stack = lambda a: a[: full * size].reshape(full, size, *a.shape[1:])
  merge = lambda a: a.reshape(full * size, *a.shape[2:])
  if labels is None:
    out = jax.vmap(lambda xc: one(xc, None))(stack(x))
  else:
    out = jax.vmap(one)(stack(x), stack(labels))
  logits, aux, found = (
    merge(out.logits),
    jax.tree.map(merge, out.aux),
    jax.tree.map(merge, out.taps),
  )
  state = jax.tree.map(lambda a: a[0], out.model_state)
  if full * size < n:
    rest = one(x[full * size :], None if labels is None else labels[full * size :])
    cat = lambda a, b: jnp.concatenate([a, b])
    logits, aux, found = (
      cat(logits, rest.logits),
      jax.tree.map(cat, aux, rest.aux),
      jax.tree.map(cat, found, rest.taps),
    )
  return base.ModelOutput(logits, state, aux, found)


def most_confusing_labels(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """``argmax_{j != y} logits_j`` ``[B]`` int32 (utils.py ``MC_labels``; paper Eq. 5).

  ``logits [B, K]`` (K >= 2), ``labels [B]`` int. The true class is excluded with -inf
  (the code writes -1e4), so the result never equals ``labels``. Stable public API.
  """
  if logits.shape[-1] < 2:
    raise ValueError(
      f"most_confusing_labels needs K >= 2 classes, got logits of shape {logits.shape}"
    )
  true = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  return jnp.argmax(jnp.where(true, -jnp.inf, logits.astype(jnp.float32)), axis=-1).astype(
    jnp.int32
  )


def angular_distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """``d(a, b) = 1 - |a.b| / (||a|| ||b||)`` ``[B]`` for ``a, b [B, D]`` (utils.py
  ``angular_distance``: the dot product is clamped to at most the norm product; paper
  Sec. 3.3). A zero vector has cos 0 (d = 1) where the code divides by zero."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  dot = jnp.sum(a * b, axis=-1)
  sa, sb = jnp.sum(a * a, axis=-1), jnp.sum(b * b, axis=-1)
  norms = jnp.sqrt(jnp.where(sa > 0, sa, 1.0)) * jnp.sqrt(jnp.where(sb > 0, sb, 1.0))
  cos = jnp.where((sa > 0) & (sb > 0), jnp.minimum(dot, norms) / norms, 0.0)
  return 1.0 - jnp.abs(cos)


def bml_triplet_loss(
  anchor: jax.Array,
  positive: jax.Array,
  negative: jax.Array,
  *,
  margin: float = 0.03,
  lam_norm: float = 0.001,
) -> jax.Array:
  """The code's ``triplet_loss(a, p, n, margin, lam2)`` (utils.py; paper Eq. 6-7), scalar:

      mean_b max(0, margin + d(a_b, p_b) - d(a_b, n_b))
        + lam_norm (mean(a^2) + mean(p^2) + mean(n^2))      (means over all B*D entries)

  with ``d = angular_distance`` (1 - |cos|). Embeddings ``[B, D]``: anchor = E(x_a),
  positive = E(x), negative = E(x_n'). The caller applies the code's factor
  ``lam1 = 2`` (to both terms). Stable public API.
  """
  for name, e in (("anchor", anchor), ("positive", positive), ("negative", negative)):
    if e.ndim != 2 or e.shape != anchor.shape:
      raise ValueError(
        f"bml_triplet_loss: {name} has shape {e.shape}; all three must be [B, D] "
        f"embeddings of one shape (anchor {anchor.shape}): pass the 'embedding' tap"
      )
  trip = jnp.mean(
    jnp.maximum(
      0.0, margin + angular_distance(anchor, positive) - angular_distance(anchor, negative)
    )
  )
  sq = lambda e: jnp.mean(jnp.square(e.astype(jnp.float32)))
  return trip + lam_norm * (sq(anchor) + sq(positive) + sq(negative))


def attention_map(features: jax.Array) -> jax.Array:
  """utils.py ``attention_map``: ``[B, H, W, C] -> [B, H, W]``, the channel sum minus its
  per-example minimum, divided by its per-example maximum after that. An all-constant map
  (maximum 0 after the shift) is all zeros here, NaN in the code."""
  if features.ndim != 4:
    raise ValueError(
      f"attention maps need [B, H, W, C] features, got shape {features.shape}: "
      "use the 'features' tap (the last feature map)"
    )
  m = jnp.sum(features.astype(jnp.float32), axis=-1)
  m = m - jnp.min(m, axis=(1, 2), keepdims=True)
  top = jnp.max(m, axis=(1, 2), keepdims=True)
  return m / jnp.where(top > 0, top, 1.0)


def attention_l1(student_features: jax.Array, teacher_features: jax.Array) -> jax.Array:
  """``F.l1_loss(attention_map(F_S), attention_map(F_T.detach()))`` (main.py ``train()``;
  paper Eq. 4 with D = L1): the mean absolute difference over all ``B*H*W`` elements of
  the two min-max normalised channel-sum maps, scalar. Features ``[B, H, W, C]`` (the
  channel counts may differ, the spatial shapes must agree); the teacher side is
  gradient-stopped. Stable public API.
  """
  if student_features.shape[:3] != teacher_features.shape[:3]:
    raise ValueError(
      f"attention_l1: student features {student_features.shape} and teacher features "
      f"{teacher_features.shape} differ in [B, H, W]: use a teacher of the same model"
    )
  teacher = attention_map(jax.lax.stop_gradient(teacher_features))
  return jnp.mean(jnp.abs(attention_map(student_features) - teacher))


def mart_term(
  logits_clean: jax.Array, logits_adv: jax.Array, labels: jax.Array, *, beta: float = 6.0
) -> jax.Array:
  """utils.py ``mart_loss(logits, logits_adv, y, kl, beta=6.0)``, scalar: MART without its CE,

      mean_b -log(1.0001 - p'_{b, y_hat} + 1e-12)
        + beta (1/B) sum_b KL(p_b || p'_b) (1.0000001 - p_{b, y_b})

  ``p = softmax(logits_clean)`` (the student's train-mode clean logits), ``p'`` that of
  ``logits_adv`` (x_a), ``y_hat`` the top class of ``p'`` other than ``y``, KL as
  ``KLDivLoss(log(p' + 1e-12), p)``; nothing detached. ``[B, K]``, ``labels [B]``.
  """
  adv = jax.nn.softmax(logits_adv.astype(jnp.float32), axis=-1)
  top2 = jnp.argsort(adv, axis=-1)[:, -2:]
  new_y = jnp.where(top2[:, -1] == labels, top2[:, -2], top2[:, -1])
  bce = -attack_losses.pick(jnp.log(1.0001 - adv + 1e-12), new_y)
  nat = jax.nn.softmax(logits_clean.astype(jnp.float32), axis=-1)
  log_nat = jax.nn.log_softmax(logits_clean.astype(jnp.float32), axis=-1)
  kl = jnp.sum(jnp.where(nat > 0, nat * (log_nat - jnp.log(adv + 1e-12)), 0.0), axis=-1)
  true = attack_losses.pick(nat, labels)
  return jnp.mean(bce) + beta * jnp.sum(kl * (1.0000001 - true)) / logits_adv.shape[0]


def _config(config) -> ml_collections.ConfigDict:
  cfg = defaults.objective_config(config, NAME, DEFAULTS)
  if not 0.0 <= float(cfg.label_smoothing) < 1.0:
    raise ValueError(
      f"objective.agkd_bml.label_smoothing = {cfg.label_smoothing!r} must lie in [0, 1) "
      "(official 0.5)"
    )
  if cfg.smoothing not in attack_losses.SMOOTHING:
    raise ValueError(
      f"objective.agkd_bml.smoothing = {cfg.smoothing!r} must be one of "
      f"{attack_losses.SMOOTHING} (official 'others')"
    )
  if cfg.steps is not None and int(cfg.steps) < 1:
    raise ValueError(
      f"objective.agkd_bml.steps = {cfg.steps!r} must be >= 1 or None (code 10, paper 2 or 7)"
    )
  if cfg.bn not in BN_CHOICES:
    raise ValueError(
      f"objective.agkd_bml.bn = {cfg.bn!r} must be one of {BN_CHOICES} (code: the DataParallel "
      "chunks; mixed: one batch)"
    )
  if isinstance(cfg.chunks, bool) or not isinstance(cfg.chunks, int) or cfg.chunks < 1:
    raise ValueError(
      f"objective.agkd_bml.chunks = {cfg.chunks!r} must be an int >= 1 (the code's 8 GPUs: 8)"
    )
  return cfg


def _frozen_fn(cfg, config, slot: TeacherSlot):
  """``frozen(splits) -> ({"teacher": variables, "bank": ClassBank}, record)``."""

  def frozen(splits):
    workdir = cfg.teacher.workdir
    teacher_cfg = teacher_config(
      workdir,
      config,
      defense="AGKD-BML",
      field=f"config.objective.{NAME}.teacher.workdir",
      empty_hint=(
        "a finished natural run (e.g. launch.train ...:MODEL,standard "
        "--config.objective.standard.label_smoothing=0.5 "
        "--config.objective.standard.smoothing=others)"
      ),
      start_note="the code starts the student from its teacher (--nat_init)",
    )
    std = teacher_cfg.get("objective", {}).get("standard", {})
    if teacher_cfg.objective.name != "standard" or float(std.get("label_smoothing", 0.0)) != 0.5:
      logging.warning(
        "AGKD-BML teacher %s is %r with label smoothing %s (the code's: standard, 0.5 over "
        "the others)",
        workdir,
        teacher_cfg.objective.name,
        std.get("label_smoothing"),
      )
    tree, record = slot.frozen(splits)
    bank = ClassBank.from_source(splits.train, splits.info.num_classes, augment=splits.info.augment)
    return {**tree, "bank": bank}, {**record, "bank": {"examples": int(bank.num_examples)}}

  return frozen


def agkd_bml(model, config) -> base.Objective:
  """AGKD-BML as coded (see the module doc); ``generate`` returns ``{"y_mc", "x_a", "x_n",
  "x_n_adv"}``, the loss's passes are ``"adv"`` (x_a), ``"clean"`` (x), ``"neg_adv"`` (x_n')."""
  cfg = _config(config)
  attack = defaults.TrainingAttack(model, config, cfg)
  if cfg.steps is not None:
    attack.steps = int(cfg.steps)
  step_size = None if cfg.step_size is None else float(cfg.step_size)
  slot = TeacherSlot(cfg.teacher.workdir, cfg.teacher.step)
  ls, smoothing = float(cfg.label_smoothing), cfg.smoothing
  bn_update = (
    f"chunk 0 of [x_a; x; x_n'] in {int(cfg.chunks)} (each chunk normalised by its own statistics)"
    if cfg.bn == "code"
    else "[x_a; x; x_n'] (one train-mode pass)"
  )

  def generate(params, model_state, aux_state, batch, key, step):
    x, y = batch["image"], batch["label"]
    k_a, k_n, k_b = jax.random.split(key, 3)
    clean = base.forward(model, params, model_state, x, mode="eval").logits
    y_mc = most_confusing_labels(clean, y)
    x_a = attack(
      params, model_state, x, y_mc, k_a, loss="ce", targeted=True, step=step, step_size=step_size
    )
    x_n = sample_by_class(aux_state[base.FROZEN]["bank"], y_mc, k_n)["image"]
    x_n_adv = attack(
      params, model_state, x_n, y, k_b, loss="ce", targeted=True, step=step, step_size=step_size
    )
    return {"y_mc": y_mc, "x_a": x_a, "x_n": x_n, "x_n_adv": x_n_adv}

  def loss(params, model_state, aux_state, batch, adv, key, step):
    del step
    x, y, n = batch["image"], batch["label"], batch["image"].shape[0]
    frozen = aux_state[base.FROZEN]
    x3, y3 = jnp.concatenate([adv["x_a"], x, adv["x_n_adv"]]), jnp.concatenate([y, y, adv["y_mc"]])
    if cfg.bn == "code":
      out = data_parallel_forward(
        model,
        params,
        model_state,
        x3,
        chunks=int(cfg.chunks),
        labels=y3,
        taps=base.ALL_TAPS,
        rng=base.pass_key(key, 0),
      )
    else:
      out = base.forward(
        model,
        params,
        model_state,
        x3,
        mode="train",
        labels=y3,
        taps=base.ALL_TAPS,
        rng=base.pass_key(key, 0),
      )
    a, c, neg = (base.slice_output(out, i * n, (i + 1) * n) for i in range(3))
    t_feats = slot.apply(
      frozen["teacher"], jnp.concatenate([x, adv["x_n"]]), taps=(FEATURES,)
    ).taps[FEATURES]
    t_feats = jax.lax.stop_gradient(t_feats)
    ce = base.cross_entropy_mean(a.logits, y, ls, smoothing)
    mart = (
      mart_term(c.logits, a.logits, y, beta=float(cfg.mart_beta))
      if cfg.mart_term
      else jnp.zeros((), jnp.float32)
    )
    att = attention_l1(a.taps[FEATURES], t_feats[:n]) + attention_l1(
      neg.taps[FEATURES], t_feats[n:]
    )
    bml = bml_triplet_loss(
      a.taps[EMBEDDING],
      c.taps[EMBEDDING],
      neg.taps[EMBEDDING],
      margin=float(cfg.margin),
      lam_norm=float(cfg.lam_norm),
    )
    value = ce + mart + float(cfg.attention_weight) * att + float(cfg.bml_weight) * bml
    metrics = {
      "adv_accuracy": base.accuracy(a.logits, y),
      "accuracy": base.accuracy(c.logits, y),
      "agkd_ce": ce,
      "agkd_mart": mart,
      "agkd_attention_l1": att,
      "agkd_bml": bml,
      "agkd_mc_target_hit": base.accuracy(a.logits, adv["y_mc"]),
      "agkd_neg_adv_target_hit": base.accuracy(neg.logits, y),
    }
    return value, base.LossAux(
      out.model_state, aux_state, metrics, {"adv": a, "clean": c, "neg_adv": neg}
    )

  return base.Objective(
    NAME,
    base.no_aux_state,
    generate,
    loss,
    base.BNPolicy(attack=attack.bn, update=bn_update),
    adaptive_loss=_adaptive,
    frozen=_frozen_fn(cfg, config, slot),
  )


def _adaptive(net, variables):
  """``{"mc": x -> -CE(f(x), argmax_{j != y} f(x)_j)}`` per example, eval mode: the
  training's forward attack (towards the most confusing class) as an evaluation attack."""
  params = variables["params"]
  state = {
    k: v
    for k, v in variables.items()
    if k not in ("params", "aux", "intermediates", "perturbations")
  }

  def towards_mc(x, labels):
    logits = base.forward(net, params, state, x, mode="eval").logits
    target = jax.lax.stop_gradient(most_confusing_labels(logits, labels))
    return -attack_losses.cross_entropy(logits, target)

  return {"mc": towards_mc}


def recipe(c, *, dataset: str, model: str, spec: str, smoke: bool) -> None:
  """``wrn28_10,agkd_bml`` on CIFAR-10, hongw579/AGKD-BML: argument.py (200 epochs, lr 0.1,
  batch 128), main.py (SGD 0.9, wd 2e-4, MultiStepLR [100, 150] x0.1, Normalize(0.5, 0.5)).
  The attack is the CIFAR config's default (PGD-10, eps 8/255, step 2/255 = the code's
  8/255*2, 2/255*2 on [-1, 1])."""
  if (dataset, model, spec) != ("cifar10", "wrn28_10", "agkd_bml"):
    return
  if not smoke:
    c.num_epochs = 200
  c.optim.boundaries = (100, 150)
  c.optim.weight_decay = 2e-4
  c.model.input_norm = "dataset"  # main.py:286, 292 Normalize((0.5,)*3, (0.5,)*3): [-1, 1]
  c.model.mean = (0.5, 0.5, 0.5)
  c.model.std = (0.5, 0.5, 0.5)


def objective(model, config) -> base.Objective:
  """The standalone ``agkd_bml`` objective of the config grammar (the defense contract)."""
  return agkd_bml(model, config)
