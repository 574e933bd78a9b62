"""Adaptive Feature Alignment (Wang et al., Tencent Youtu; ``../shared/papers/``): the
first public implementation (the authors released no code). Every choice the paper
leaves open is a config field below with its default and the reason.

Two runs, two objective names in the config grammar:

  ``MODEL,afa``         stage I  (this module's ``objective`` = :func:`afa_stage1`)
  ``MODEL,afa_stage2``  stage II (:mod:`agad.defenses.afa_stage2`, which imports nothing
                        from this module)

Stage I (paper Sec. 4.3, Algorithm 1, Eq. 3). Every BN layer of the backbone becomes a
K-branch BN (:class:`~agad.models.layers.MultiBranchBatchNorm`, K = ``num_branches`` = 5,
the paper's choice, Table 4) through :func:`norm`; branch k handles attack strength xi_k
of the ladder ``xi = ladder * config.attack.eps`` (default ``(0, 1/8, 2/8, 4/8, 1)``:
{0, 1, 2, 4, 8}/255 at CIFAR's 8/255, {0, 1, 2, 4, 8}/8 * 0.1 on Fashion-MNIST); step
sizes scale the same way, ``ladder * config.attack.step_size``. For a batch ``(x, y)`` of
B examples:

    x'_k = PGD_{xi_k}(x, y) through BN_k                         k = 1 .. K-1
    L    = L_c(x, y) + sum_{k=1}^{K-1} L_a(x, x'_k, y)           (Algorithm 1)

L_c is the clean CE through BN_0; L_a is the base objective's per-pair loss
(``base``): ``pgd_at`` CE(f_k(x'_k), y); ``trades`` ``trades_loss(f_k(x), f_k(x'_k), y)``;
``mart`` ``mart_loss(f_k(x), f_k(x'_k), y)``, with f_k the network routed through BN_k.
The K-1 attacks are ONE attack (:func:`ladder_attack`) over the stacked batch
``[x; ...; x]`` ``[(K-1) B]`` with per-example eps/step and per-example routing
``norm_ctx={'mix': one_hot(k, K)}`` in eval mode (exactly BN_k per example: running
statistics, no cross-example coupling). Branch k's chunk starts from
``pgd_init(fold_in(key, k), x, eps=xi_k)``, so the stacked attack equals K-1 separate
``TrainingAttack`` calls with keys ``fold_in(key, k)`` and ``norm_ctx={'branch': k}``
(tested). The loss then runs one train-mode pass per branch, ``{'branch': k}`` over that
branch's B examples, so each example updates only its strength's running statistics.

Stage II (Sec. 4.2-4.3, Fig. 4b). ``afa_stage2.norm`` replaces every BN by
:class:`~agad.defenses._afa_norm.AFANorm`: BN_0 and BN_{K-1} kept (same variable names as
stage I, so ``init.workdir=<stage-I run>`` copies them by identity; the middle branches
are dropped), fused by a weight generator (Eqs. 1-2; one per stage by default, handed to the
stage's BN layers through the backbone's ``norm_hook``; ``wg_per="layer"``: one per BN layer):
``x_hat = W0 BN_0(x) + (1 - W0) BN_{K-1}(x)``, ``W0 = sigmoid(WG(x))`` sown as
``aux/afa_w0``. Everything but the WGs is frozen (``init.freeze`` =
``afa_stage2.STAGE2_FREEZE``, parameters; ``freeze_stats`` = running statistics); the WGs train on CE only, on inputs
attacked with a random strength per example, ``eps_b = u_b * xi_max``, ``u_b ~ U(0, 1)``
(step ``u_b * attack.step_size``), PGD through the deployed model in eval mode. The
deployed model IS the WGs + both branches: ``agad.load(run).logits_fn`` runs it end to end
(no ``norm_ctx``), so every evaluation attack sees the real defense.

Adaptive attacks (stage II, ``adaptive_loss``; the paper's "PGD+Ada", Sec. 5.2): PGD on
``a CE(f(x), y) + b BCE(W0, 0)`` through the eval-mode deployed model for the paper's 7
ratios a:b in {10:1, 5:1, 2:1, 1:1, 1:2, 1:5, 1:10}, variants ``ce10_bce1`` ...
``ce1_bce10``; BCE(W0, 0) = -log(1 - W0) = softplus(WG logit), averaged over layers (and
channels), ascended: it pushes W0 towards 1, i.e. makes the adversarial input look clean
to the fusion (the reference review's reading; the paper's supplement is unavailable).

Parameters (10 classes; stage I adds (K-1) x 2C per BN layer; stage II drops K-2 of them,
adds WGs): per stage (default) SmallCNN-BN 323,036 (2 WGs), WRN-28-10 36.67M (4 WGs);
``wg_per="layer"`` (144 C + 2,657 per WG at width 16): SmallCNN-BN (28x28x1) 314,122 ->
351,246 (4 WGs), WRN-28-10 36,551,002 -> 37,856,115 (25), WRN-16-8 11,521,511 (13).

Open choices and defaults (docs/defenses/afa.md lists them too):
  * ladder relative to ``attack.eps`` (one default for every dataset);
  * L_a's clean pass in branch k (TRADES/MART need f_k(x)) runs in ``"batch"`` mode
    (batch statistics, no update), so BN_k's running statistics see only strength-k
    examples (``clean_in_branch="train"``: they see x too, a literal PyTorch port);
  * the attack of branch k maximises the base's attack loss (CE; TRADES: KL from
    f_k(x)) from the base's start (TRADES/MART: 0.001 N(0, 1); PGD-AT: config.attack);
  * losses summed over branches as Algorithm 1 (``loss_reduction="sum"``): K losses through
    shared weights take a K-times larger step than one loss would; ``"mean"`` divides by K
    (on Fashion-MNIST ``smallcnn_bn`` the sum killed 91% of the BN-free hidden Linear's units
    in 312 steps, docs/results/afa.md);
  * one WG per network stage reading the stage's input, its scalar W0 shared by the stage's
    BN layers (``wg_per="stage"``, the default); ``wg_per="layer"``: one WG per BN
    layer reading that layer's input (Eq. 1-2 literally);
  * WG width 16, scalar W0 (``wg_out="channel"``: one per channel);
  * stage II: statistics frozen, eps ~ U(0, xi_max) per example, CE only;
  * stage I's own validation/eval routes ``norm_ctx=None`` = BN_0 (the clean branch);
    stage II starts from the stage-I run's latest checkpoint (``init.step=latest``);
  * schedules (configs/): stage I 100 epochs, lr decay x0.1 at 75/90; stage II 20 epochs,
    lr 0.01 (CIFAR-10) / 0.001 (SVHN), x0.1 at 10 (the paper's "factor 0.9" read as 0.1:
    a 0.9 decay twice would leave the learning rate almost unchanged).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from agad.attacks import driver as driver_lib
from agad.attacks import iterative as pgd_lib
from agad.attacks import losses as attack_losses
from agad.models.layers import MultiBranchBatchNorm
from agad.objectives import base, defaults
from agad.objectives.mart import mart_loss
from agad.objectives.training_attack import TrainingAttack
from agad.objectives.trades import trades_loss

BASES = ("pgd_at", "trades", "mart")
CLEAN_MODES = ("batch", "train")
REDUCTIONS = ("sum", "mean")

# Fields and their comments stay aligned (the defaults are their own documentation).
# fmt: off
DEFAULTS = ml_collections.ConfigDict()
DEFAULTS.num_branches = 5          # K BN branches (paper: K = 5, Table 4 ablates 2/3/5/9).
DEFAULTS.ladder = (0.0, 0.125, 0.25, 0.5, 1.0)  # xi_k / attack.eps: {0,1,2,4,8}/255 at 8/255 (Tab. 1).
DEFAULTS.base = "pgd_at"           # L_a: pgd_at | trades | mart (paper: also IAT, not offered).
DEFAULTS.beta = 6.0                # TRADES/MART beta inside L_a (their official 6).
DEFAULTS.random_start = ml_collections.FieldReference(None, field_type=str)  # None: the base's.
DEFAULTS.attack_bn = "eval"        # BN mode of the ladder attack (eval: per-example routing is exact).
DEFAULTS.clean_in_branch = "batch"  # TRADES/MART's f_k(x): batch (no stats update) | train.
DEFAULTS.loss_reduction = "sum"    # sum (Algorithm 1) | mean: (L_c + sum_k L_a) / K, the same step as one loss.
# fmt: on


def norm(config: Any):
  """Stage I's norm factory: ``MultiBranchBatchNorm`` with K branches."""
  cfg = defaults.objective_config(config, "afa", DEFAULTS)
  return functools.partial(MultiBranchBatchNorm, num_branches=int(cfg.num_branches))


def ladder_radii(config: Any, cfg: Any) -> tuple[np.ndarray, np.ndarray]:
  """``(eps [K], step [K])`` = ``ladder * attack.eps``, ``ladder * attack.step_size``.

  The ladder must have K entries, start at 0 (branch 0 is clean) and increase.
  """
  ladder = np.asarray(cfg.ladder, np.float64)
  k = int(cfg.num_branches)
  if k < 2 or ladder.shape != (k,):
    raise ValueError(
      f"objective.afa.ladder={tuple(cfg.ladder)} must have num_branches={k} >= 2 "
      "entries (fractions of attack.eps), e.g. (0, 0.125, 0.25, 0.5, 1)"
    )
  if ladder[0] != 0 or np.any(np.diff(ladder) <= 0):
    raise ValueError(
      f"objective.afa.ladder={tuple(cfg.ladder)} must start at 0 (the clean branch) "
      "and increase strictly"
    )
  return ladder * float(config.attack.eps), ladder * float(config.attack.step_size)


def branch_key(key: jax.Array, k: int) -> jax.Array:
  """The key of branch k's attack: ``fold_in(key, k)``."""
  return jax.random.fold_in(key, k)


def ladder_attack(
  attack: TrainingAttack,
  params,
  model_state,
  images,
  labels,
  key,
  *,
  eps,
  step_size,
  loss: str = "ce",
  step=None,
) -> jax.Array:
  """The K-1 attacks of stage I as one PGD over the stacked batch.

  Args:
    attack: the objective's ``TrainingAttack`` (steps, norm, start, BN mode, driver,
      eps warm-up).
    images ``[B, H, W, C]``, labels ``[B]``.
    eps, step_size: ``[K]`` per branch (entry 0, the clean branch, is not attacked).
    loss: ``"ce"`` or ``"kl"`` (TRADES: ``KL(p_k(x) || p_k(x'))``, p_k(x) fixed).
  Returns:
    ``[(K-1) B, H, W, C]``: rows ``(k-1) B .. k B - 1`` attack branch k at ``eps[k]``,
    equal to ``attack(..., branch_key(key, k), eps=eps[k], step_size=step_size[k],
    norm_ctx={'branch': k})``: the same start per chunk and, per example, the same
    gradient (eval-mode routing ``{'mix': one_hot(k)}`` is exactly BN_k, the loss is
    per example).
  """
  num_branches = len(eps)
  b = images.shape[0]
  branch = np.repeat(np.arange(1, num_branches), b)  # [(K-1) B]
  eps_b, step_b = attack.radius(
    step,
    eps=jnp.asarray(np.asarray(eps, np.float32)[branch]),
    step_size=jnp.asarray(np.asarray(step_size, np.float32)[branch]),
  )
  x0 = jnp.concatenate([images] * (num_branches - 1))
  y = jnp.concatenate([labels] * (num_branches - 1))
  logits_fn = attack.logits_fn(
    params, model_state, norm_ctx={"mix": jax.nn.one_hot(branch, num_branches)}
  )
  if loss == "ce":
    loss_fn = lambda x: attack_losses.cross_entropy(logits_fn(x), y)
  elif loss == "kl":
    ref = jax.lax.stop_gradient(jax.nn.softmax(logits_fn(x0).astype(jnp.float32), axis=-1))
    loss_fn = lambda x: attack_losses.kl_divergence(ref, logits_fn(x))
  else:
    raise ValueError(f"ladder attack loss {loss!r} is not 'ce' or 'kl'")
  starts = [
    pgd_lib.pgd_init(
      branch_key(key, k),
      images,
      eps=eps_b[(k - 1) * b : k * b],
      norm=attack.norm,
      random_start=attack.random_start,
    ).x
    for k in range(1, num_branches)
  ]
  state = pgd_lib.PGDState(x=jnp.concatenate(starts), key=key)
  norm_name = attack.norm
  step_fn = driver_lib.as_partial(
    lambda s: pgd_lib.pgd_step(loss_fn, x0, eps_b, step_b, s, norm=norm_name)
  )
  state = driver_lib.iterate(step_fn, state, attack.steps, driver=attack.driver)
  return jax.lax.stop_gradient(state.x)


def _pair_loss(base_name: str, beta: float):
  """``(logits_clean_k | None, logits_adv_k, y) -> scalar`` L_a of the base objective."""
  if base_name == "pgd_at":
    return lambda lc, la, y: base.cross_entropy_mean(la, y)
  if base_name == "trades":
    return lambda lc, la, y: trades_loss(lc, la, y, beta=beta)
  return lambda lc, la, y: mart_loss(lc, la, y, beta=beta)


def _stage1_config(config: Any) -> ml_collections.ConfigDict:
  """``config.objective.afa`` with its choice fields checked."""
  cfg = defaults.objective_config(config, "afa", DEFAULTS)
  if cfg.base not in BASES:
    raise ValueError(f"objective.afa.base={cfg.base!r} is not one of {BASES}")
  if cfg.clean_in_branch not in CLEAN_MODES:
    raise ValueError(
      f"objective.afa.clean_in_branch={cfg.clean_in_branch!r} is not one of {CLEAN_MODES}"
    )
  if cfg.loss_reduction not in REDUCTIONS:
    raise ValueError(
      f"objective.afa.loss_reduction={cfg.loss_reduction!r} is not one of {REDUCTIONS}"
    )
  return cfg


def afa_stage1(model, config: Any) -> base.Objective:
  """Stage I: K-branch BN, ``L_c(x) + sum_k L_a(x, x'_k, y)`` (see module docstring)."""
  cfg = _stage1_config(config)
  reduction = cfg.loss_reduction
  eps, step_size = ladder_radii(config, cfg)
  k_total = len(eps)
  paired = cfg.base in ("trades", "mart")
  random_start = cfg.random_start or ("normal" if paired else None)
  attack = TrainingAttack(model, config, {"random_start": random_start, "attack_bn": cfg.attack_bn})
  attack_loss = "kl" if cfg.base == "trades" else "ce"
  pair_loss = _pair_loss(cfg.base, float(cfg.beta))

  def generate(params, model_state, aux_state, batch, key, step):
    del aux_state
    return ladder_attack(
      attack,
      params,
      model_state,
      batch["image"],
      batch["label"],
      key,
      eps=eps,
      step_size=step_size,
      loss=attack_loss,
      step=step,
    )

  def loss(params, model_state, aux_state, batch, adv, key, step):
    del step
    x, y = batch["image"], batch["label"]
    b = x.shape[0]
    clean = base.forward(
      model,
      params,
      model_state,
      x,
      mode="train",
      labels=y,
      norm_ctx={"branch": 0},
      taps=base.ALL_TAPS,
      rng=base.pass_key(key, 0),
    )
    model_state = clean.model_state
    loss_clean = base.cross_entropy_mean(clean.logits, y)
    total = loss_clean
    passes = {"clean": clean}
    metrics = {"accuracy": base.accuracy(clean.logits, y), "loss_clean": loss_clean}
    index = 1
    for k in range(1, k_total):
      ctx = {"branch": k}
      logits_clean_k = None
      if paired:
        out = base.forward(
          model,
          params,
          model_state,
          x,
          mode=cfg.clean_in_branch,
          labels=y,
          norm_ctx=ctx,
          rng=base.pass_key(key, index),
        )
        index += 1
        model_state = out.model_state
        logits_clean_k = out.logits
      out = base.forward(
        model,
        params,
        model_state,
        adv[(k - 1) * b : k * b],
        mode="train",
        labels=y,
        norm_ctx=ctx,
        taps=base.ALL_TAPS,
        rng=base.pass_key(key, index),
      )
      index += 1
      model_state = out.model_state
      term = pair_loss(logits_clean_k, out.logits, y)
      total = total + term
      passes[f"adv{k}"] = out
      metrics[f"adv_accuracy_{k}"] = base.accuracy(out.logits, y)
      metrics[f"loss_adv_{k}"] = term
    if reduction == "mean":
      total = total / k_total
    passes["adv"] = passes[f"adv{k_total - 1}"]
    metrics["adv_accuracy"] = metrics[f"adv_accuracy_{k_total - 1}"]
    return total, base.LossAux(model_state, aux_state, metrics, passes)

  update = "clean -> BN_0, x'_k -> BN_k (one train-mode pass per branch)" + (
    f"; f_k(x) in {cfg.clean_in_branch} mode" if paired else ""
  )
  return base.Objective(
    "afa", base.no_aux_state, generate, loss, base.BNPolicy(attack=attack.bn, update=update)
  )


def objective(model, config) -> base.Objective:
  """The standalone ``afa`` objective of the config grammar (the defense contract)."""
  return afa_stage1(model, config)
