"""Config fuzzing: every bad value gives ONE clear error naming the field and what is accepted.

Draws bad values (seeded, deterministic) over the whole config tree of
``configs/fashion_mnist.py`` (one field changed per draw), every ``objective.<name>.*``
field of every defense, the objective spec, the eval config, and the flags of
``launch.evaluate`` / ``launch.attention``; each must raise before any work (no model
compiled, no data read) with a one-line message ``config.FIELD=VALUE is invalid: ACCEPTED``
(``--FLAG=VALUE is invalid: ACCEPTED`` for flags) that names the field and the accepted
values. In process: the validation functions the launch scripts call. Four subprocesses
prove the launch path end to end: ``FATAL <the message>`` on stderr, exit status 1, no
traceback, nothing written.

The test's own tables (``CONFIG_KINDS``, ``DEFENSE_KINDS``, ``EVAL_KINDS``) say what each
field accepts independently of the library's rules; a field added to ``base_config``
without a rule in ``agad.training.builders.config_rules`` fails
``test_every_config_field_has_a_rule``.
"""

from __future__ import annotations

import collections
import copy
import json
import math
import os
import random
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from agad import data as data_lib
from agad import defenses
from agad import models as models_lib
from agad import validation
from agad.evaluation.defaults import eval_defaults
from agad.training import builders
from configs import common as configs_common
from configs import fashion_mnist
from launch import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 20261206
NAN, INF = float("nan"), float("inf")

# ------------------------------------------------------------------ what each field accepts
# kind -> (bad values, tokens every message must contain). The test's own statement of the
# schema; messages must name the field and these accepted values.


def _int(lo):
  return ([lo - 1, lo - 7, 2.5, str(lo + 1), True, None], ["integer", f">= {lo}"])


def _optint(lo):
  return ([lo - 1, lo - 4, 2.5, "all", True], ["None", "integer", f">= {lo}"])


def _choice(options, extra=()):
  shown = [o for o in options if o]
  bad = ["bogus", shown[0].upper() + "_", 3, None, *extra]
  return (bad, list(shown))


def _range(lo, hi, hi_open):
  text = f"[{lo:g}, {hi:g}{')' if hi_open else ']'}"
  return ([lo - 0.1, hi if hi_open else hi + 0.25, 7.0, NAN, "0.5", True], [text])


POS = ([0, 0.0, -1.0, NAN, INF, "0.1", True, None], ["> 0"])
NONNEG = ([-0.1, -5, NAN, INF, "0", False], [">= 0"])
BOOL = (["yes", 1, 0.0, None, "True"], ["True | False"])
EPS = ([1.5, -0.1, 3.0, NAN, "0.1", None, True], ["radius", "[0, 1]"])
STEP = (["last", -1, "1.5", 2.5, None, ""], ["latest", "best"])
REGEXES = (["(", "a,[", 5, None], ["regular expressions"])

CONFIG_KINDS = {
  "seed": _int(0),
  "batch_size": _int(1),
  "num_epochs": POS,
  "data.name": _choice(data_lib.DATASET_NAMES, extra=("mnist", "cifar-10")),
  "data.data_dir": ([3, ["a"], True], ["None", "string"]),
  "data.val_size": _int(0),
  "data.val_seed": _int(0),
  "data.max_train": _optint(1),
  "data.max_test": _optint(1),
  "data.num_train": _int(1),
  "data.num_test": _int(1),
  "data.image_shape": (
    [(28, 28), (28, 28, 0), (28, 28.0, 1), "28x28x1", (-1, 28, 1), 28],
    ["(H, W, C)", "integers >= 1"],
  ),
  "data.num_classes": _int(2),
  "model.name": _choice(models_lib.MODEL_NAMES, extra=("resnet99", "wrn")),
  "model.dtype": _choice(("float32", "bfloat16"), extra=("float16",)),
  "model.input_norm": _choice(("dataset", "per_image", "none"), extra=("per_dataset",)),
  "model.mean": ([(0.5, 0.5), "0.5", (0.5, "a"), (NAN,), 0.5], ["None", "one per channel"]),
  "model.std": (
    [(0.0,), (-1.0,), (0.5, 0.5), "1", (INF,)],
    ["None", "positive", "one per channel"],
  ),
  "objective.name": None,  # the spec: its own category below
  "attack.eps": EPS,
  "attack.step_size": POS,
  "attack.steps": _int(1),
  "attack.norm": _choice(("linf", "l2"), extra=("l1", "Linf")),
  "attack.random_start": _choice(("uniform", "normal", "none"), extra=(False,)),
  "attack.bn": _choice(("eval", "batch"), extra=("train",)),
  "attack.driver": _choice(("auto", "unroll", "loop", "host")),
  "attack.eps_warmup_steps": _int(0),
  "optim.name": _choice(("sgd",), extra=("adam", "adamw", "SGD")),
  "optim.lr": POS,
  "optim.momentum": _range(0, 1, True),
  "optim.nesterov": BOOL,
  "optim.weight_decay": NONNEG,
  "optim.grad_clip": NONNEG,
  "optim.schedule": _choice(("piecewise", "cosine", "constant"), extra=("linear", "step")),
  "optim.warmup_epochs": NONNEG,
  "optim.boundaries": ([(90, 75), (-1, 5), ("75",), 75, (75, 75), None], ["increasing", ">= 0"]),
  "optim.decay_factor": POS,
  "ema_decay": _range(0, 1, True),
  "validation.batch_size": _int(1),
  "validation.use_ema": BOOL,
  "validation.seed": _int(0),
  "validation.adaptive": BOOL,
  "validation.attack.eps": EPS,
  "validation.attack.step_size": POS,
  "validation.attack.steps": _int(1),
  "validation.attack.norm": _choice(("linf", "l2"), extra=("l1",)),
  "validation.attack.random_start": _choice(("uniform", "normal", "none")),
  "checkpoint.keep": _int(1),
  "checkpoint.every_steps": _int(0),
  "checkpoint.async_save": BOOL,
  "checkpoint.best_metric": _choice(
    ("", "val/robust_accuracy", "val/clean_accuracy"), extra=("test/acc", "val/robust")
  ),
  "init.workdir": ([3, None, ("a",)], ["workdir"]),
  "init.step": STEP,
  "init.param_map": (["a", "x=y,z", 3, None], ["dst_prefix=src_prefix"]),
  "init.freeze": REGEXES,
  "init.keep_init": REGEXES,
  "eps": ([1.5, -0.1, NAN, "0.1", True], ["None", "[0, 1]"]),
  "allow_eps_mismatch": BOOL,
  "log_every_steps": _int(1),
  "prefetch": _int(1),
  "stop_after_steps": _int(0),
}

EVAL_KINDS = {
  "batch_size": _int(1),
  "pgd_steps": _int(1),
  "restarts": _int(1),
  "cw_steps": _int(1),
  "step_size": POS,
  "cw_step_size": POS,
  "eps": EPS,
  "num_examples": ([0, -5, 2.5, "all", True], ["None", "integer >= 1"]),
  "params": (["emma", "best", 3, None], ["auto", "params", "ema"]),
  "preset": (
    ["bogus", "PGD", "aa", 3, None],
    ["pgd", "table", "table_aa", "full", "autoattack", "ladder"],
  ),
  "ladder": (
    [(0.5, 0.25, 1.0), (0.5,), (0.0, 1.0), (0.5, 1.5), (), "1.0", ("a", 1.0)],
    ["increasing factors", "(0, 1]", "ending at 1"],
  ),
  "aa_version": (["fast", "Standard", None], ["standard", "plus", "rand"]),
  "cw_kappa": ([-1.0, NAN, "50", None], [">= 0"]),
  "cache": (["yes", 1, None], ["True | False"]),
  "seed": _int(0),
}

OPTCHOICE = lambda options, none: (
  [b for b in _choice(options)[0] if b is not None],
  ["None", none, *options],
)  # noqa: E731
SITES = ([3, (3,), ("",), "", ()], ["site names"])
DEFENSE_KINDS = {
  "attack_bn": OPTCHOICE(("eval", "batch"), "config.attack.bn"),
  "random_start": OPTCHOICE(("uniform", "normal", "none"), "config.attack.random_start"),
  "bn_updates": (["clean", "adv,adv", "clean,noisy", "", 3], ["'clean'", "'adv'"]),
  "steps": ([0, -2, 2.5, "7"], ["None", "config.attack.steps", ">= 1"]),
  "step_size": ([0.0, -0.01, NAN, "0.01"], ["None", "config.attack.step_size", "> 0"]),
  "again.step_size": ([-0.01, NAN, "0.01", None], [">= 0", "config.attack.step_size"]),
  **{
    k: NONNEG
    for k in (
      "beta",
      "weight",
      "gamma",
      "lam_at",
      "lam_lp",
      "lam_sep",
      "lam_rec",
      "attention_weight",
      "bml_weight",
      "mart_beta",
      "margin",
      "lam_norm",
    )
  },
  **{
    k: POS
    for k in ("proxy_lr", "mixup_alpha", "tau", "adaptive_tau_backward", "hff_eps", "eps_max")
  },
  "warmup_steps": _int(0),
  "label_smoothing": _range(0, 1, True),
  "smoothing": _choice(("all", "others")),
  "alpha": _range(0, 1, False),
  "width": _int(1),
  "wg_width": _int(1),
  "num_branches": _int(2),
  "base": _choice(("pgd_at", "trades", "mart"), extra=("alp", "iat")),
  "clean_in_branch": _choice(("batch", "train"), extra=("eval",)),
  "loss_reduction": _choice(("sum", "mean")),
  "wg_per": _choice(("stage", "layer"), extra=("row",)),
  "wg_out": _choice(("scalar", "channel")),
  "keep": (
    [(0,), (0, 1, 2), (0.0, 1), "0,-1", (0, 5), (1, 1), (0, -5)],
    ["branch indices", "(0, -1)"],
  ),
  "ladder": (
    [(0.0, 0.5), (0.1, 0.2, 0.3, 0.4, 1.0), (0, 0.5, 0.25, 0.75, 1), ("a",) * 5, 0.5],
    ["fractions of attack.eps", "from 0", "increasing"],
  ),
  "adaptive_ratios": (["10-1", "a:b", "-1:2", "", 3, "0:0"], ["CE:BCE"]),
  "variant": _choice(
    ("paper", "code_cifar10", "code_cifar100", "logit_mse", "cam_mse"), extra=("code",)
  ),
  "cam_norm": _choice(("auto", "minmax", "none")),
  "cam_scale": _choice(("auto", "per_example", "code")),
  "student_relu": _choice(("auto", "yes", "no"), extra=(True,)),
  "student_start": _choice(("auto", "code", "teacher"), extra=("random",)),
  "target": _choice(("least_likely", "random", "untargeted")),
  "schedule": (["linear", "gradual", 3, None], ["none", "not implemented"]),
  "sites": SITES,
  "again.sites": ([3, (3,), ("",), ""], ["site names"]),
  "atat.sites": ([3, (3,), ("",), "", ()], ["site names"]),
  "site": ([3, "", ("features",), None], ["site name"]),
  "teacher.workdir": ([3, None, ("a",)], ["workdir"]),
  "teacher.step": STEP,
  **{k: BOOL for k in ("hff", "rec_bn_relu", "mart_term", "freeze_stats", "independent_mixing")},
}

# The config each defense's fields are fuzzed on (fashion_mnist.py, smallcnn or its BN twin).
SPECS = {
  "afa": "smallcnn_bn,afa",
  "afa_stage2": "smallcnn_bn,afa_stage2",
  "awp": "smallcnn,pgd_at+awp",
  "cas": "smallcnn,pgd_at+cas",
  "fsr": "smallcnn,pgd_at+fsr",
}


# ------------------------------------------------------------------ helpers

_BASES = {}


def _base(arg="smallcnn,pgd_at"):
  if arg not in _BASES:
    _BASES[arg] = fashion_mnist.get_config(arg).to_dict()
  return _BASES[arg]


def _with(arg, path, value):
  """The config of ``arg`` with ``path`` set to ``value`` (any type: a dict, not a locked
  ConfigDict, as a library caller or a saved config.json may hold)."""
  d = copy.deepcopy(_base(arg))
  node = d
  *parents, leaf = path.split(".")
  for p in parents:
    node = node.setdefault(p, {})
  node[leaf] = value
  return ml_collections.ConfigDict(d)


def _get(config, path):
  node = config
  for p in path.split("."):
    node = node[p]
  return node


class Draw(collections.namedtuple("Draw", "category field value run tokens prefix")):
  """``run()`` must raise; its one-line message starts with ``prefix`` and holds ``tokens``."""


def _config_draw(category, arg, path, value, tokens, field=None):
  config = _with(arg, path, value)
  field = field or path
  shown = _get(config, field) if field == path else value
  if isinstance(shown, ml_collections.ConfigDict):
    shown = shown.to_dict()
  return Draw(
    category,
    f"config.{field}",
    value,
    lambda: common.check_train_config(config),
    tokens,
    f"config.{field}={shown!r} is invalid: ",
  )


def _classify(path, value, kind):
  """The category of a draw, for the report."""
  bad, tokens = kind
  if path.endswith(("eps",)) and not isinstance(value, (str, bool)) and value is not None:
    return "eps outside [0, 1]"
  if (
    value is None
    or isinstance(value, bool)
    or (
      isinstance(value, str)
      and tokens
      and any(t.startswith((">", "[", "integer", "radius", "(H")) for t in tokens)
    )
  ):
    return "wrong type"
  if isinstance(value, float) and "integer" in tokens:
    return "wrong type"
  if isinstance(value, (int, float)) and any(t.startswith((">", "[", "integer")) for t in tokens):
    return (
      "negative, zero or out of range"
      if not (isinstance(value, float) and math.isnan(value))
      else "nan / inf"
    )
  if any(s in path for s in (".bn", "attack_bn")):
    return "bad bn mode"
  if path in ("config.optim.name", "config.optim.schedule"):
    return "bad optimizer / schedule name"
  if path in ("config.data.name", "config.model.name"):
    return "unknown dataset / model"
  return "bad name, shape or format"


def config_draws(rng):
  draws = []
  for path, kind in CONFIG_KINDS.items():
    if kind is None:
      continue
    bad, tokens = kind
    for value in rng.sample(bad, min(3, len(bad))):
      d = _config_draw(None, "smallcnn,pgd_at", path, value, tokens)
      draws.append(d._replace(category=_classify(d.field, value, kind)))
  # The global batch over the 4 test devices (tests/conftest.py).
  for value in (130, 126, 2, 6, 510):
    draws.append(
      _config_draw(
        "batch not divisible by the 4 devices",
        "smallcnn,pgd_at",
        "batch_size",
        value,
        ["a multiple of the 4 devices"],
      )
    )
  return draws


def named_draws():
  """Names the brief singles out: BN modes, optimizer and schedule names, datasets and models."""
  rows = [
    ("bad bn mode", "smallcnn,pgd_at", "attack.bn", v, ["eval", "batch"])
    for v in ("train", "Batch", "running", "eval ")
  ]
  rows += [
    ("bad bn mode", arg, f"objective.{name}.attack_bn", v, ["None", "eval", "batch"])
    for arg, name, v in (
      ("smallcnn,trades", "trades", "train"),
      ("smallcnn,mart", "mart", "running"),
      ("smallcnn,atat", "atat", "Eval"),
      ("smallcnn_bn,afa", "afa", "train"),
    )
  ]
  rows += [
    ("bad optimizer / schedule name", "smallcnn,pgd_at", "optim.name", v, ["sgd"])
    for v in ("adam", "adamw", "SGD", "momentum")
  ]
  rows += [
    (
      "bad optimizer / schedule name",
      "smallcnn,pgd_at",
      "optim.schedule",
      v,
      ["piecewise", "cosine", "constant"],
    )
    for v in ("linear", "step", "Cosine", "onecycle")
  ]
  rows += [
    ("unknown dataset / model", "smallcnn,pgd_at", "data.name", v, list(data_lib.DATASET_NAMES))
    for v in ("mnist", "cifar-10", "imagenet", "CIFAR10")
  ]
  rows += [
    ("unknown dataset / model", "smallcnn,pgd_at", "model.name", v, list(models_lib.MODEL_NAMES))
    for v in ("resnet99", "wrn", "ResNet18", "vit_b16")
  ]
  return [
    _config_draw(category, arg, path, value, tokens) for category, arg, path, value, tokens in rows
  ]


def eval_config_draws(rng):
  draws = []
  for field, (bad, tokens) in EVAL_KINDS.items():
    for value in rng.sample(bad, min(2, len(bad))):
      d = _config_draw(None, "smallcnn,pgd_at", f"eval.{field}", value, tokens)
      draws.append(d._replace(category="eval config (config.eval.*)"))
  return draws


def _defense_names():
  n = defenses.names()
  return sorted(set(n["objectives"]) | set(n["transforms"]))


def defense_draws(rng):
  draws, untabled = [], []
  for name in _defense_names():
    arg = SPECS.get(name, f"smallcnn,{name}")
    for path, default in validation.flatten(defenses.defaults(name)).items():
      kind = (
        DEFENSE_KINDS.get(f"{name}.{path}")
        or DEFENSE_KINDS.get(path)
        or DEFENSE_KINDS.get(path.split(".")[-1])
      )
      if kind is None:  # a field this table does not know yet: its type is still checked
        untabled.append(f"{name}.{path}")
        kind = ([3 if isinstance(default, str) else "x"], [])
      bad, tokens = kind
      for value in rng.sample(bad, min(2, len(bad))):
        draws.append(
          _config_draw(
            "defense field (objective.<name>.*)", arg, f"objective.{name}.{path}", value, tokens
          )
        )
  return draws, untabled


def unknown_key_draws():
  rows = [
    ("optim.learning_rate", 0.1, "lr"),
    ("attack.epsilon", 0.1, "eps"),
    ("learning_rate", 0.1, "batch_size"),
    ("data.nmae", "cifar10", "name"),
    ("validation.attack.eps_step", 0.1, "step_size"),
    ("model.width", 4, "dtype"),
    ("checkpoint.every", 5, "every_steps"),
    ("foo.bar", 1, "optim"),
    ("init.workdirs", "", "workdir"),
    ("eval.batchsize", 32, "batch_size"),
    ("eval.epsilon", 0.1, "eps"),
  ]
  draws = [
    _config_draw("unknown key", "smallcnn,pgd_at", path, value, ["no such field", sibling])
    for path, value, sibling in rows
  ]
  for arg, path, sibling in (
    ("smallcnn,trades", "objective.trades.betta", "beta"),
    ("smallcnn,atat", "objective.atat.teacher.wrkdir", "workdir"),
    ("smallcnn,pgd_at+awp", "objective.awp.gama", "gamma"),
    ("smallcnn,pgd_at", "objective.pgd_at.beta", "(none)"),
    ("smallcnn,pgd_at+cas", "objective.cas.site", "sites"),
  ):
    draws.append(_config_draw("unknown key", arg, path, 1.0, ["no such field", sibling]))
  draws.append(
    _config_draw(
      "unknown key",
      "smallcnn,trades",
      "objective.trade",
      {"beta": 1.0},
      ["no such objective or defense", "trades"],
    )
  )
  return draws


BAD_SPECS = [
  "trades++fsr",
  "fsrr",
  "+awp",
  "trades+",
  "awp",
  "trades+mart",
  "trades+awp+awp",
  "",
  "  ",
  "Trades",
  "pgd-at",
  "trades awp",
  "cas+pgd_at",
  "pgd_at+fsr+fsr",
  "standard+",
  3,
  None,
  "tradez+awp",
  "pgd_at+awpp",
]


def spec_draws():
  return [
    _config_draw(
      "malformed objective spec",
      "smallcnn,pgd_at",
      "objective.name",
      spec,
      ["objectives: ", "pgd_at", "transforms: ", "awp"],
    )
    for spec in BAD_SPECS
  ]


def cross_field_draws():
  draws = []
  for path, value in (("attack.eps", 0.05), ("validation.attack.eps", 0.2), ("eval.eps", 8 / 255)):
    d = _config_draw(
      "cross-field",
      "smallcnn,pgd_at",
      path,
      value,
      ["attack.eps=", "validation.attack.eps=", "eval.eps=", "allow_eps_mismatch"],
    )
    draws.append(d._replace(prefix="the radii differ ("))
  rows = [
    (
      "smallcnn_bn,afa",
      "objective.afa.num_branches",
      3,
      "objective.afa.ladder",
      ["num_branches=3"],
    ),
    (
      "smallcnn_bn,afa_stage2",
      "objective.afa_stage2.keep",
      (1, -4),
      "objective.afa_stage2.keep",
      ["two different branch indices", "[-5, 5)"],
    ),
    (
      "smallcnn_bn,afa_stage2",
      "objective.afa_stage2.wg_out",
      "channel",
      "objective.afa_stage2.wg_out",
      ["wg_per='layer'"],
    ),
    ("smallcnn,atat", "objective.atat.sites", (), "objective.atat.sites", ["non-empty", "variant"]),
  ]
  for arg, path, value, field, tokens in rows:
    config = _with(arg, path, value)
    draws.append(
      Draw(
        "cross-field",
        f"config.{field}",
        value,
        lambda c=config: common.check_train_config(c),
        tokens,
        f"config.{field}=",
      )
    )
  synthetic = _with("smallcnn,pgd_at", "data.name", "synthetic")
  synthetic.data.val_size = 512
  draws.append(
    Draw(
      "cross-field",
      "config.data.val_size",
      512,
      lambda: common.check_train_config(synthetic),
      ["data.num_train=512"],
      "config.data.val_size=512 is invalid: ",
    )
  )
  return draws


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A training workdir as launch.evaluate / launch.attention see it: config.json and
  checkpoints/5 (the flags are checked before any checkpoint is read)."""
  root = tmp_path_factory.mktemp("fuzz_run")
  with open(root / "config.json", "w") as f:
    json.dump(
      json.loads(fashion_mnist.get_config("smallcnn,pgd_at,smoke").to_json_best_effort()), f
    )
  os.makedirs(root / "checkpoints" / "5")
  return str(root)


def evaluate_draws(workdir, tmp):
  empty = os.path.join(tmp, "empty_run")
  os.makedirs(empty, exist_ok=True)
  presets = ["pgd", "table", "table_aa", "full", "autoattack", "ladder"]
  rows = [("preset", v, presets) for v in ("bogus", "PGD", "", "aa", "pgd-20")]
  rows += [("num_examples", v, ["integer >= 1"]) for v in (0, -5, -1)]
  rows += [("chunk", v, ["integer >= 1"]) for v in (0, -1000)]
  rows += [
    ("step", v, ["best", "latest", "saved step"]) for v in ("bogus", "-1", "1.5", "", "99", "Best")
  ]
  rows += [("workdir", v, ["training workdir"]) for v in (os.path.join(tmp, "nowhere"), "", empty)]
  rows += [("surrogate", os.path.join(tmp, "nowhere"), ["training workdir"])]
  draws = []
  for flag, value, tokens in rows:
    kw = dict(
      workdir=workdir, step="best", preset=None, num_examples=None, surrogate=None, chunk=1000
    )
    kw[flag] = value
    draws.append(
      Draw(
        "launch.evaluate flags",
        f"--{flag}",
        value,
        lambda kw=kw: common.check_evaluate_flags(**kw),
        tokens,
        f"--{flag}={value!r} is invalid: ",
      )
    )
  for override, field, tokens in (
    ({"eps": 2.0}, "eps", ["[0, 1]"]),
    ({"batch_size": 0}, "batch_size", [">= 1"]),
    ({"preset": "bogus"}, "preset", presets),
    ({"pgd_steps": "x"}, "pgd_steps", [">= 1"]),
  ):
    draws.append(
      Draw(
        "launch.evaluate flags",
        f"--config.eval.{field}",
        override[field],
        lambda o=override: common.check_evaluate_flags(workdir=workdir, eval_config=o),
        tokens,
        f"config.eval.{field}={override[field]!r} is invalid: ",
      )
    )
  draws.append(
    Draw(
      "launch.evaluate flags",
      "--config.eval.batchsize",
      32,
      lambda: common.check_evaluate_flags(workdir=workdir, eval_config={"batchsize": 32}),
      ["batch_size"],
      "eval_config has unknown fields ['batchsize']",
    )
  )
  return draws


def attention_draws(workdir, tmp):
  rows = [("num_images", v, ["integer >= 1"]) for v in (0, -1, -16)]
  rows += [("figure_images", v, ["integer >= 1"]) for v in (0, -2)]
  rows += [("steps", v, ["integer >= 1"]) for v in (0, -20)]
  rows += [("seed", -1, ["integer >= 0"])]
  rows += [
    ("kinds", ["bogus"], ["grad_cam", "cam", "channel_mean"]),
    ("kinds", ["grad_cam", "gradcam"], ["grad_cam", "channel_mean"]),
  ]
  rows += [
    ("site", v, ["valid site names", "features"])
    for v in ("nope", "stage9.unit[0]", "featurs", "stage1.unit[3]")
  ]
  rows += [("site", "", ["site name"])]
  rows += [("step", v, ["best", "latest"]) for v in ("bogus", "-3", "7")]
  rows += [
    ("compare_step", "x", ["best", "latest"]),
    ("compare", [os.path.join(tmp, "nowhere")], ["training workdir"]),
    ("workdir", os.path.join(tmp, "nowhere"), ["training workdir"]),
  ]
  draws = []
  for flag, value, tokens in rows:
    kw = dict(workdir=workdir, compare=[workdir] if flag == "compare_step" else None)
    kw[flag] = value
    shown = ",".join(value) if flag == "kinds" else (value[0] if flag == "compare" else value)
    draws.append(
      Draw(
        "launch.attention flags",
        f"--{flag}",
        value,
        lambda kw=kw: common.check_attention_flags(**kw),
        tokens,
        f"--{flag}={shown!r} is invalid",
      )
    )
  return draws


def _flag_values(argv):
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", None, "config", flag_values=fv, lock_config=True, sys_argv=argv
  )
  flags.DEFINE_string("workdir", None, "workdir", flag_values=fv)
  return fv


def _parse_message(argv):
  """What ``common.parse_flags`` prints for ``argv``, from a real absl parse (a private
  FlagValues, so nothing global is touched)."""
  try:
    _flag_values(argv)(argv)
  except flags.Error as e:
    return common.flag_error_message(argv, e)
  except (AttributeError, KeyError) as e:
    return common.unknown_field_message(argv, e)[len("FATAL ") :]
  return None


def cli_draws():
  cfg = "--config=configs/fashion_mnist.py:smallcnn,pgd_at"
  rows = [
    ([cfg, "--config.attack.eps=abc"], ["--config.attack.eps=abc", "type float", "0.1"]),
    ([cfg, "--config.batch_size=1.5"], ["--config.batch_size=1.5", "type int", "128"]),
    ([cfg, "--config.optim.nesterov=maybe"], ["--config.optim.nesterov=maybe", "type bool"]),
    (
      [cfg, "--config.optim.learning_rate=0.1"],
      ["--config.optim.learning_rate", "fields of config.optim", "lr"],
    ),
    (
      [cfg, "--config.attack.nrm=l2"],
      ["--config.attack.nrm", "fields of config.attack", "did you mean 'norm'"],
    ),
    (
      ["--config=configs/fashion_mnist.py:smallcnn,trades++fsr"],
      ["config.objective.name='trades++fsr' is invalid", "empty name", "objectives: "],
    ),
    (
      ["--config=configs/fashion_mnist.py:smallcnn,fsrr"],
      ["unknown objective or defense 'fsrr'", "objectives: "],
    ),
    (
      ["--config=configs/fashion_mnist.py:resnet99,pgd_at"],
      ["unknown model 'resnet99'", "smallcnn"],
    ),
    (["--config=configs/fashion_mnist.py:a,b,c"], ["expected MODEL,OBJECTIVE"]),
  ]
  return [
    Draw(
      "CLI parse errors (--config...)",
      argv[-1],
      argv[-1],
      lambda argv=argv: _raise_if(_parse_message(["prog", *argv, "--workdir=/tmp/x"])),
      tokens,
      "",
    )
    for argv, tokens in rows
  ]


class _Message(Exception):
  pass


def _raise_if(message):
  if message is not None:
    raise _Message(message)


def all_draws(workdir, tmp):
  rng = random.Random(SEED)
  defense, untabled = defense_draws(rng)
  draws = (
    config_draws(rng)
    + named_draws()
    + eval_config_draws(rng)
    + defense
    + unknown_key_draws()
    + spec_draws()
    + cross_field_draws()
    + evaluate_draws(workdir, tmp)
    + attention_draws(workdir, tmp)
    + cli_draws()
  )
  return draws, untabled


# ------------------------------------------------------------------ tests


def test_the_unchanged_configs_and_flags_pass(workdir):
  """The controls: without a bad value nothing is refused (so every refusal below is the
  bad value's)."""
  for arg in ["smallcnn,pgd_at", *(SPECS.get(n, f"smallcnn,{n}") for n in _defense_names())]:
    common.check_train_config(ml_collections.ConfigDict(_base(arg)))
    common.check_train_config(fashion_mnist.get_config(arg))
  common.check_evaluate_flags(
    workdir=workdir,
    step="5",
    preset="ladder",
    num_examples=10,
    chunk=10,
    surrogate=workdir,
    eval_config={"eps": 0.1},
  )
  common.check_attention_flags(
    workdir=workdir,
    compare=[workdir],
    site="stage2.pre_pool",
    num_images=4,
    kinds=["grad_cam", "channel_mean"],
    step="latest",
    compare_step="5",
  )
  assert (
    _parse_message(
      [
        "prog",
        "--config=configs/fashion_mnist.py:smallcnn,trades+awp",
        "--config.objective.trades.beta=3.0",
        "--workdir=/tmp/x",
      ]
    )
    is None
  )


def test_every_config_field_has_a_rule():
  """base_config's fields, the library's rules and this test's table are the same set."""
  fields = {
    k
    for k in validation.flatten(configs_common.base_config())
    if not k.startswith(("eval.", "objective."))
  }
  fields.add("objective.name")
  assert fields == set(builders.config_rules()) == set(CONFIG_KINDS)
  assert set(eval_defaults().keys()) == set(EVAL_KINDS)


def test_fuzzed_bad_values_each_give_one_clear_error(workdir, tmp_path, capsys):
  draws, untabled = all_draws(workdir, str(tmp_path))
  failures, counts = [], collections.Counter()
  for d in draws:
    counts[d.category] += 1
    try:
      d.run()
    except (ValueError, TypeError, KeyError, _Message) as e:
      message = common.one_line(e)
      raw = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
      problems = []
      if "\n" in raw or "Traceback" in raw:
        problems.append("not one line")
      if not message.startswith(d.prefix):
        problems.append(f"does not start with {d.prefix!r}")
      missing = [t for t in d.tokens if t not in message]
      if missing:
        problems.append(f"lacks {missing}")
      if problems:
        failures.append(
          f"[{d.category}] {d.field}={d.value!r}: {'; '.join(problems)}\n    {message}"
        )
    except Exception as e:  # noqa: BLE001 - any other exception is a raw crash
      failures.append(f"[{d.category}] {d.field}={d.value!r}: raw {type(e).__name__}: {e}")
    else:
      failures.append(f"[{d.category}] {d.field}={d.value!r}: accepted (a silent start)")
  with capsys.disabled():
    print(f"\nconfig fuzz: {len(draws)} draws (seed {SEED})")
    for category, n in sorted(counts.items(), key=lambda kv: -kv[1]):
      print(f"  {n:4d}  {category}")
    if untabled:
      print(f"  defense fields without an entry in DEFENSE_KINDS (type-checked only): {untabled}")
  assert not failures, f"{len(failures)} of {len(draws)} draws:\n" + "\n".join(failures)
  assert len(draws) >= 200
  for category in (
    "wrong type",
    "negative, zero or out of range",
    "eps outside [0, 1]",
    "unknown key",
    "malformed objective spec",
    "unknown dataset / model",
    "batch not divisible by the 4 devices",
    "bad optimizer / schedule name",
    "bad bn mode",
    "defense field (objective.<name>.*)",
    "launch.evaluate flags",
    "launch.attention flags",
  ):
    assert counts[category] >= 3, (category, counts)


def test_draws_are_deterministic(workdir, tmp_path):
  first = [(d.field, repr(d.value)) for d in all_draws(workdir, str(tmp_path))[0]]
  again = [(d.field, repr(d.value)) for d in all_draws(workdir, str(tmp_path))[0]]
  assert first == again


def test_preflight_refuses_what_needs_the_model():
  """Plug-in sites and a backbone too small for the images: abstract shapes, no data."""
  config = fashion_mnist.get_config("smallcnn,pgd_at+cas")
  config.objective.cas.sites = ("nope",)
  with pytest.raises(
    ValueError,
    match=r"config.objective.cas.sites=\('nope',\) is invalid for model 'smallcnn': "
    r".*'nope'.*valid site names: .*features",
  ):
    builders.preflight(config)
  with pytest.raises(ValueError, match=r"'vgg16' cannot take 'fashion_mnist' images"):
    builders.preflight(fashion_mnist.get_config("vgg16,pgd_at"))
  builders.preflight(fashion_mnist.get_config("smallcnn,trades+awp"))


# ------------------------------------------------------------------ end to end (4 subprocesses)


@pytest.mark.slow
def test_launch_scripts_print_one_fatal_line_and_write_nothing(workdir, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  never = str(tmp_path / "never")
  attention_out = str(tmp_path / "attention_out")
  cases = [
    (
      [
        "launch.train",
        "--config=configs/fashion_mnist.py:smallcnn,trades,smoke",
        f"--workdir={never}",
        "--config.objective.trades.beta=-1.0",
      ],
      "FATAL config.objective.trades.beta=-1.0 is invalid: a finite number >= 0",
    ),
    (
      [
        "launch.train",
        "--config=configs/fashion_mnist.py:smallcnn,trades++fsr",
        f"--workdir={never}",
      ],
      "config.objective.name='trades++fsr' is invalid: OBJECTIVE[+TRANSFORM...]",
    ),
    (
      ["launch.evaluate", f"--workdir={workdir}", "--preset=bogus"],
      "FATAL --preset='bogus' is invalid: pgd | table | table_aa | full | autoattack | ladder",
    ),
    (
      ["launch.attention", f"--workdir={workdir}", "--num_images=0", f"--output={attention_out}"],
      "FATAL --num_images=0 is invalid: an integer >= 1",
    ),
  ]
  procs = [
    subprocess.Popen(
      [sys.executable, "-m", *args],
      cwd=REPO,
      env=env,
      text=True,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
    )
    for args, _ in cases
  ]
  for (args, expected), proc in zip(cases, procs):
    out, err = proc.communicate(timeout=120)
    fatal = [l for l in err.splitlines() if l.startswith("FATAL")]
    assert proc.returncode == 1, (args, err[-2000:])
    assert len(fatal) == 1 and expected in fatal[0], (args, err[-2000:])
    assert "Traceback" not in err, (args, err[-2000:])
  assert not os.path.exists(never) and not os.path.exists(attention_out)
  assert not os.path.exists(os.path.join(workdir, "eval"))
