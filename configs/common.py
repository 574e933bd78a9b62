"""Shared config builder. Dataset files call ``build(dataset_defaults, arg)``.

Argument grammar (``--config=configs/<dataset>.py:ARG``):
``MODEL,OBJECTIVE[+TRANSFORM...][,smoke]``, e.g. ``smallcnn,pgd_at``,
``resnet18,trades+awp``, ``smallcnn,pgd_at,smoke``. Empty parts take the dataset's
defaults. ``smoke`` shrinks data, model work and schedule for tests and laptops.
"""

from __future__ import annotations

from typing import NamedTuple

import ml_collections

from agad import defenses
from agad import models as models_lib
from agad.defenses._validate import check_spec
from agad.evaluation.defaults import eval_defaults


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Fields and their comments stay aligned (the config is its own documentation).
  # fmt: off
  c.seed = 0                       # Seeds init, data order, attacks (trajectory field).
  c.batch_size = 128               # Global batch over all devices and hosts.
  c.num_epochs = 10                # Epochs over the train split (float allowed).

  c.data = ml_collections.ConfigDict()
  c.data.name = "fashion_mnist"    # fashion_mnist | cifar10 | cifar100 | svhn_cropped | tiny_imagenet | synthetic
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # None: dataset default location.
  c.data.val_size = 5000           # Examples carved from train for checkpoint selection.
  c.data.val_seed = 0              # Seed of the fixed validation carve (independent of c.seed).
  c.data.max_train = ml_collections.FieldReference(None, field_type=int)  # Cap on train examples (smoke).
  c.data.max_test = ml_collections.FieldReference(None, field_type=int)   # Cap on test examples (smoke).
  c.data.num_train = 512           # synthetic only: train examples.
  c.data.num_test = 128            # synthetic only: test examples.
  c.data.image_shape = (28, 28, 1)  # synthetic only: H, W, C.
  c.data.num_classes = 10          # synthetic only: classes.

  c.model = ml_collections.ConfigDict()
  c.model.name = "smallcnn"        # One of agad.models.MODEL_NAMES.
  c.model.dtype = "float32"        # Compute dtype: float32 | bfloat16 (params stay float32).
  c.model.input_norm = "dataset"   # dataset (mean/std below) | per_image (ATAT) | none (raw [0, 1]).
                                   # CIFAR/SVHN/Tiny ImageNet default to none (docs/recipes.md).
  c.model.mean = ml_collections.FieldReference(None, field_type=tuple)  # None: the dataset's; AGKD-BML: (0.5,)*3 ([-1, 1]).
  c.model.std = ml_collections.FieldReference(None, field_type=tuple)   # None: the dataset's.

  c.objective = ml_collections.ConfigDict()
  c.objective.name = "pgd_at"      # OBJECTIVE[+TRANSFORM...], e.g. trades+awp.
  # objective.<name>.*: each name's DEFAULTS (its module's), added by apply_arg for the
  # names of the spec, so --config.objective.<name>.<field>=... overrides work.

  c.attack = ml_collections.ConfigDict()   # The training attack (inner maximisation).
  c.attack.eps = 8 / 255           # L-inf radius in [0, 1] pixel units.
  c.attack.step_size = 2 / 255     # PGD step size.
  c.attack.steps = 10              # PGD steps.
  c.attack.norm = "linf"           # linf | l2.
  c.attack.random_start = "uniform"  # uniform | normal (0.001 N(0,1)) | none.
  c.attack.bn = "eval"             # BN during the attack: eval (running stats) | batch (batch stats, not updated).
  c.attack.driver = "unroll"       # unroll (CPU) | loop (GPU/TPU): see agad/attacks/driver.py.
  c.attack.eps_warmup_steps = 0    # Ramp eps and step size linearly over the first N steps (0 = off).

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "sgd"             # Only SGD (+momentum) is used by the seed papers.
  c.optim.lr = 0.1                 # Peak learning rate.
  c.optim.momentum = 0.9           # SGD momentum.
  c.optim.nesterov = False         # Nesterov momentum.
  c.optim.weight_decay = 5e-4      # Coupled (PyTorch-style) weight decay on every parameter.
  c.optim.grad_clip = 0.0          # > 0: clip the gradient's global L2 norm to this (0 = off, as the papers).
  c.optim.schedule = "piecewise"   # piecewise | cosine | constant.
  c.optim.warmup_epochs = 0.0      # Linear warm-up from 0 (epochs).
  c.optim.boundaries = (75, 90)    # piecewise: epochs at which lr *= decay_factor.
  c.optim.decay_factor = 0.1       # piecewise: multiplicative decay.

  c.ema_decay = 0.0                # EMA of params (0 = off). Validation uses it if validation.use_ema.

  c.validation = ml_collections.ConfigDict()
  c.validation.batch_size = 500    # Eval batch (padded to a multiple of the device count).
  c.validation.use_ema = True      # Validate the EMA params when ema_decay > 0.
  c.validation.seed = 1234         # Attack randomness for validation.
  c.validation.adaptive = True    # Also PGD on the objective's adaptive loss (CAS family); worst case.
  c.validation.attack = ml_collections.ConfigDict()  # PGD for validation (eval-mode BN).
  c.validation.attack.eps = 8 / 255   # Validation radius (datasets set it to attack.eps).
  c.validation.attack.step_size = 2 / 255  # Validation PGD step size.
  c.validation.attack.steps = 10           # Validation PGD steps.
  c.validation.attack.norm = "linf"        # linf | l2.
  c.validation.attack.random_start = "uniform"  # uniform | normal | none.

  c.eval = eval_defaults()         # launch.evaluate defaults (test split): agad/evaluation/defaults.py.

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.keep = 2            # Latest checkpoints kept (plus the best by validation).
  c.checkpoint.every_steps = 0     # Extra checkpoints every N steps (0: only at epoch ends).
  c.checkpoint.async_save = True   # Orbax async saving.
  c.checkpoint.best_metric = ""    # Picks step=best: val/robust_accuracy | val/clean_accuracy
                                   # ('' = clean for objective 'standard', robust otherwise).

  c.init = ml_collections.ConfigDict()     # Start from another run's weights.
  c.init.workdir = ""              # Source workdir ('' = random init).
  c.init.step = "latest"           # latest | best | step number.
  c.init.param_map = ""            # 'dst_prefix=src_prefix,...' on '/'-joined paths ('' = identity).
  c.init.freeze = ""               # Comma-separated regexes of parameter paths to freeze.
  c.init.keep_init = ""            # Comma-separated regexes: parameters the source lacks keep their init.

  c.eps = ml_collections.FieldReference(None, field_type=float)  # One radius: --config.eps=8/255 sets
                                   # attack.eps, validation.attack.eps and eval.eps (each unless set
                                   # explicitly too); None: those three fields as they are.
  c.allow_eps_mismatch = False    # True: attack.eps, validation.attack.eps and eval.eps may differ
                                   # (otherwise training refuses; --config.eps sets all three).
  c.log_every_steps = 50           # Host sync + log + non-finite check interval.
  c.prefetch = 2                   # Batches prefetched to devices.
  c.stop_after_steps = 0           # Stop (and checkpoint) after this many steps; 0 = run to the end.
  # fmt: on
  return c


class Arg(NamedTuple):
  """A parsed config argument: ``model`` / ``spec`` are None where the argument leaves the
  dataset's default."""

  model: str | None
  spec: str | None
  smoke: bool


def parse_arg(arg: str | None) -> Arg:
  """``"MODEL,OBJECTIVE[+T...][,smoke]"`` -> :class:`Arg` (the one parser of the grammar)."""
  parts = [p.strip() for p in (arg or "").split(",")]
  smoke = "smoke" in parts
  parts = [p for p in parts if p and p != "smoke"]
  if len(parts) > 2:
    raise ValueError(f"config arg {arg!r}: expected MODEL,OBJECTIVE[+T...][,smoke]")
  return Arg(parts[0] if parts else None, parts[1] if len(parts) == 2 else None, smoke)


def apply_arg(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """The model and objective of ``arg`` on the dataset's config ``c``, then the recipes of
  the spec's defenses (``recipe`` of each module, see ``agad.defenses``), then ``smoke``."""
  model, spec, smoke = parse_arg(arg)
  if model is not None:
    if model not in models_lib.MODEL_NAMES:
      raise ValueError(
        f"config arg {arg!r}: unknown model {model!r}; known: {sorted(models_lib.MODEL_NAMES)}"
      )
    c.model.name = model
  if spec is not None:
    check_spec(spec)  # Fails early (empty, repeated or unknown names) with the known ones.
    c.objective.name = spec
  defenses.apply_recipes(
    c, dataset=c.data.name, model=c.model.name, spec=c.objective.name, smoke=smoke
  )
  if defenses.spec_names(c.objective.name)[0] == "standard":
    # Standard training is chosen on clean accuracy.
    c.checkpoint.best_metric = "val/clean_accuracy"
  defenses.add_defaults(c)
  if smoke:
    c.data.max_train = 384
    c.data.max_test = 128
    c.data.val_size = 64
    c.batch_size = 32
    c.num_epochs = 2
    c.attack.steps = 2
    c.validation.attack.steps = 2
    c.validation.batch_size = 64
    c.eval.pgd_steps = 3
    c.eval.batch_size = 64
    c.optim.schedule = "constant"
    c.optim.lr = 0.01
    c.log_every_steps = 4
    c.checkpoint.keep = 2
  return c
