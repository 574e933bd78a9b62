"""Default hyperparameters of the base objectives, and how an objective reads them.

``objective_defaults()`` returns one sub-dict per objective (``config.objective.<name>``),
every value being the official code's CIFAR-10 setting unless the comment says otherwise.
The training attack itself (eps, step_size, steps, norm, random_start, bn, driver) lives in
``config.attack``; an objective only overrides the fields its official code fixes
(e.g. TRADES' 0.001 N(0, 1) start and eval-mode BN). ``None`` in an override field means
"use ``config.attack``".

``objective_config(config, name)`` merges ``config.objective.<name>`` (when present) over
these defaults, so a dataset config only lists what it changes. ``TrainingAttack`` is
the training PGD of an objective (``config.attack`` plus the objective's overrides).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections

from agad.attacks import iterative as pgd_lib
from agad.objectives import base


def objective_defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # TRADES (Zhang et al. 2019; yaodongyu/TRADES trades.py, train_trades_cifar10.py).
  c.trades = ml_collections.ConfigDict()
  c.trades.beta = 6.0                 # weight of (1/B) sum KL(p_clean || p_adv); official CIFAR-10: 6.
  c.trades.random_start = "normal"    # attack start x + 0.001 N(0, 1), as trades.py. None: config.attack.
  c.trades.attack_bn = "eval"         # BN mode inside the KL attack (model.eval() in trades.py). None: config.attack.bn.
  # Train-mode forward passes, in order, each updating the BN running statistics.
  # trades.py runs model(x) for CE, then model(x_adv) and model(x) again for the KL:
  # "clean,adv,clean". The gradient always flows through exactly one clean and one
  # adversarial pass (the repeated clean pass is numerically identical). TRADES-AWP's
  # trainer uses "adv,clean,clean".
  c.trades.bn_updates = "clean,adv,clean"

  # MART (Wang et al. 2020; YisenWang/MART mart.py, train_wideresnet.py).
  c.mart = ml_collections.ConfigDict()
  c.mart.beta = 6.0                   # weight of the misclassification-aware KL term; official: 6.
  c.mart.random_start = "normal"      # mart.py starts from x + 0.001 N(0, 1) (not uniform). None: config.attack.
  c.mart.attack_bn = "eval"           # CE attack under model.eval(). None: config.attack.bn.
  c.mart.bn_updates = "clean,adv"     # mart.py: model(x) then model(x_adv), both train mode.

  # ALP (Kannan et al. 2018; tensorflow/models research/adversarial_logit_pairing).
  c.alp = ml_collections.ConfigDict()
  c.alp.weight = 0.5                  # train_lp_weight: weight * mean((z(x) - z(x'))^2); README: 0.5.
  c.alp.label_smoothing = 0.1         # model_lib.default_hparams(): label_smoothing=0.1 on [x; x'].
  # Training attack target: "least_likely" (pgdll_*: targeted PGD towards argmin of the
  # clean eval-mode logits, the official setting), "random" (pgdrnd_*) or "untargeted"
  # (pgd_*: the official code's untargeted option uses the *predicted* label).
  c.alp.target = "least_likely"
  c.alp.random_start = None           # official: U(-eps, eps), i.e. config.attack's usual "uniform".
  c.alp.attack_bn = "eval"            # attack on model_fn(x, is_training=False).

  # IAT (Lamb et al. 2019). No official code: agad's choices, after the ndb796 reimplementation.
  c.iat = ml_collections.ConfigDict()
  c.iat.mixup_alpha = 1.0             # lambda ~ Beta(alpha, alpha), one scalar per half per step (mixup).
  # Independent (lambda, permutation) draws for the clean half and the adversarial half
  # (as the reimplementation). False: the same draw for both halves.
  c.iat.independent_mixing = True
  c.iat.random_start = None           # PGD from a uniform start (reimplementation), i.e. config.attack.
  c.iat.attack_bn = "eval"            # the reimplementation attacks the train-mode model (its bug); agad: eval.

  # AWP (Wu et al. 2020; csdongxian/AWP utils_awp.py), a transform: "<objective>+awp".
  c.awp = ml_collections.ConfigDict()
  c.awp.gamma = 0.005                 # relative weight-perturbation size per >=2-D tensor. TRADES-AWP: 0.005; AT-AWP: 0.01.
  c.awp.proxy_lr = 0.1                # lr of the one proxy SGD step. TRADES-AWP: 0.1; AT-AWP: 0.01. (It cancels in
                                      # v = gamma ||w|| diff / ||diff|| except through the 1e-20 guard.)
  # No perturbation while step < warmup_steps (in optimizer steps). TRADES-AWP applies AWP
  # from epoch 10 of 1-indexed epochs (awp_warmup=10), i.e. set 9 * steps_per_epoch to
  # reproduce it; AT-AWP uses 0.
  c.awp.warmup_steps = 0

  # CAS (Bai et al. ICLR 2021; bymavis/CAS_ICLR2021 Standard_Adv_Training).
  c.cas = ml_collections.ConfigDict()
  c.cas.weight = 2.0                  # --beta: CE(f(x'), y) + weight * mean_k CE(aux_k(x'), y); official 2.
  # Plug-in sites (one aux head each). Official ResNet-18 puts CAS after each of the two
  # units of layer4 (2 heads); agad's default is the final feature map only.
  c.cas.sites = ("features",)
  c.cas.random_start = "uniform"      # reg_attack.py: random_start=True, U(-eps, eps). None: config.attack.
  c.cas.attack_bn = "eval"            # attack with model(x, _eval=True): running stats, predicted-label masks.
  return c


def _as_dict(tree: Any) -> dict:
  if tree is None:
    return {}
  if isinstance(tree, ml_collections.ConfigDict):
    return tree.to_dict()
  return dict(tree)


def objective_config(config: Any, name: str) -> ml_collections.ConfigDict:
  """``config.objective.<name>`` merged over ``objective_defaults().<name>``.

  Unknown keys in the user's sub-dict are an error (they are usually typos).
  """
  defaults = objective_defaults()
  if name not in defaults:
    raise KeyError(f"no defaults for objective {name!r}; known: {sorted(defaults.keys())}")
  merged = _as_dict(defaults[name])
  objective_cfg = getattr(config, "objective", None) if config is not None else None
  user = _as_dict(getattr(objective_cfg, name, None) if objective_cfg is not None else None)
  unknown = sorted(set(user) - set(merged))
  if unknown:
    raise KeyError(f"config.objective.{name} has unknown fields {unknown}; known: {sorted(merged)}")
  merged.update(user)
  return ml_collections.ConfigDict(merged)


def attack_setting(objective_cfg: Any, attack_cfg: Any, field: str, attack_field: str):
  """The objective's override of a ``config.attack`` field, or the attack's own value."""
  value = objective_cfg.get(field) if hasattr(objective_cfg, "get") else getattr(objective_cfg, field, None)
  return getattr(attack_cfg, attack_field) if value is None else value


class TrainingAttack:
  """The training attack of one objective: ``config.attack`` with the objective's overrides.

  ``bn`` and ``random_start`` come from the objective's ``attack_bn``/``random_start``
  fields when set, otherwise from ``config.attack``; eps, step_size, steps, norm and
  driver always come from ``config.attack``. ``config.attack.eps_warmup_steps`` (W > 0)
  ramps the radius and step size linearly, ``eps * min(1, (step + 1) / W)``, so the
  first updates see weak attacks (a recipe option for short schedules, off by default).
  """

  def __init__(self, model, config: Any, objective_cfg: Any):
    attack_cfg = config.attack
    self.model = model
    self.bn = attack_setting(objective_cfg, attack_cfg, "attack_bn", "bn")
    self.random_start = attack_setting(objective_cfg, attack_cfg, "random_start", "random_start")
    self.eps = attack_cfg.eps
    self.step_size = attack_cfg.step_size
    self.steps = attack_cfg.steps
    self.norm = attack_cfg.norm
    self.driver = getattr(attack_cfg, "driver", "auto")
    self.eps_warmup_steps = int(getattr(attack_cfg, "eps_warmup_steps", 0) or 0)
    if self.bn not in ("eval", "batch"):
      raise ValueError(f"training-attack BN mode {self.bn!r} must be 'eval' or 'batch' "
                       "('train' would update running statistics during the attack)")

  def logits_fn(self, params, model_state):
    return base.logits_fn_for(self.model, params, model_state, mode=self.bn)

  def radius(self, step=None):
    """``(eps, step_size)`` at training step ``step`` (the warm-up ramp, if any)."""
    if not self.eps_warmup_steps or step is None:
      return self.eps, self.step_size
    scale = jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / self.eps_warmup_steps)
    return self.eps * scale, self.step_size * scale

  def __call__(self, params, model_state, images, labels, key, *, loss="ce", targeted=False,
               step=None):
    """PGD on a named loss (``"ce"``, ``"kl"``, ...) through the objective's BN mode."""
    eps, step_size = self.radius(step)
    return pgd_lib.pgd(self.logits_fn(params, model_state), images, labels, key, eps=eps,
                       step_size=step_size, steps=self.steps, norm=self.norm,
                       random_start=self.random_start, loss=loss, targeted=targeted,
                       driver=self.driver)

  def general(self, loss_fn, images, key, *, step=None):
    """PGD maximising a per-example ``loss_fn(x) -> [B]`` (built by the caller)."""
    eps, step_size = self.radius(step)
    return pgd_lib.pgd_general(loss_fn, images, key, eps=eps, step_size=step_size,
                               steps=self.steps, norm=self.norm, random_start=self.random_start,
                               driver=self.driver)


def bn_pass_order(spec: str) -> tuple[str, ...]:
  """``"clean,adv,clean"`` -> ``("clean", "adv", "clean")``, validated."""
  order = tuple(s.strip() for s in spec.split(",") if s.strip())
  if not order or set(order) - {"clean", "adv"} or "clean" not in order or "adv" not in order:
    raise ValueError(f"bn_updates {spec!r} must list 'clean' and 'adv' passes, e.g. 'clean,adv,clean'")
  return order
