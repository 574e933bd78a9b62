"""AFA stage II under its config-grammar name: ``--config=...:MODEL,afa_stage2``.

The objective and norm factory live in :mod:`agad.defenses.afa` (see its docstring);
this module holds stage II's ``config.objective.afa_stage2`` fields, so the registry
(``agad.defenses.<name>``) finds them beside the objective, and the recipe the configs apply
(:func:`stage2_recipe`); it imports no JAX and never imports ``afa`` at module level.
"""

import ml_collections

DEFAULTS = ml_collections.ConfigDict()
DEFAULTS.num_branches = 5   # K of the stage-I run.
DEFAULTS.keep = (0, -1)     # kept branches: BN_0 and BN_{K-1} (Fig. 4b); W0 weights the first.
DEFAULTS.eps_max = 1.0      # xi_max / attack.eps; training strengths eps ~ U(0, xi_max).
DEFAULTS.wg_width = 16      # WG conv/hidden width (not in the paper).
DEFAULTS.wg_per = "stage"   # stage: one WG per stage on its input (plus stem/final norms) | layer: one per BN layer.
DEFAULTS.wg_out = "scalar"  # scalar W0 (Eq. 1) | channel (one per channel; wg_per=layer only).
DEFAULTS.freeze_stats = True  # kept branches use running statistics, never updated.
DEFAULTS.random_start = ml_collections.FieldReference(None, field_type=str)  # None: config.attack.
DEFAULTS.adaptive_ratios = "10:1,5:1,2:1,1:1,1:2,1:5,1:10"  # CE:BCE of the adaptive attacks (Sec. 5.2).

# Stage II trains the weight generators only: freeze every other parameter (regex on
# '/'-joined paths, re.search) and let the WGs (absent from the stage-I run) keep their init.
STAGE2_FREEZE = r"^(?!(.*/)?wg/)"
STAGE2_KEEP_INIT = r"(^|/)wg/"


def stage2_recipe(c, *, lr: float, num_epochs: float = 20, boundaries=(10,)):
  """Stage II's schedule and freezing on config ``c`` (paper Sec. 5.1: 20 epochs, decay
  x0.1 at epoch 10; lr 0.01 CIFAR-10 / 0.001 SVHN). ``init.workdir`` is the user's."""
  c.num_epochs = num_epochs
  c.optim.lr = lr
  c.optim.schedule = "piecewise"
  c.optim.boundaries = tuple(boundaries)
  c.optim.decay_factor = 0.1
  c.optim.warmup_epochs = 0.0
  c.attack.eps_warmup_steps = 0
  c.init.freeze = STAGE2_FREEZE
  c.init.keep_init = STAGE2_KEEP_INIT
  return c


def spec_head(arg: str | None) -> str:
  """The objective head of a config argument ``MODEL,OBJECTIVE[,smoke]`` ('' if none)."""
  parts = [p.strip() for p in (arg or "").split(",") if p.strip() and p.strip() != "smoke"]
  return parts[1].split("+")[0].strip() if len(parts) > 1 else ""


def objective(model, config):
  """``MODEL,afa_stage2``: :func:`agad.defenses.afa.afa_stage2` (which reads DEFAULTS lazily)."""
  from agad.defenses import afa
  return afa.afa_stage2(model, config)


def norm(config):
  """The deployed fusion norm of stage II: :func:`agad.defenses.afa.stage2_norm`."""
  from agad.defenses import afa
  return afa.stage2_norm(config)


def norm_hook(config):
  """The per-stage weight generators (``wg_per='stage'``): :func:`agad.defenses.afa.stage2_norm_hook`."""
  from agad.defenses import afa
  return afa.stage2_norm_hook(config)
