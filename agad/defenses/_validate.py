"""Checks of ``config.objective``: the spec and every ``objective.<name>.*`` field.

What ``agad.training.builders.check_config`` runs for the objective, before any work and
on values only: the spec ``OBJECTIVE[+TRANSFORM...]`` (known names, no empty or repeated
part), then for each name of the spec its fields: known (in the module's ``DEFAULTS``),
the rule of :func:`field_rules` for the field's name (shared by every defense that has
it; ``"<name>.<field>"`` entries override it for one defense), else the type of the
``DEFAULTS`` value; then the cross-field rules below and the module's own ``_config``
where it has one. Messages: ``config.objective.NAME.FIELD=VALUE is invalid: ACCEPTED``.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from agad.attacks import losses as attack_losses
from agad.defenses import _registry as registry
from agad.defenses._afa_norm import WG_OUTS
from agad.objectives.defaults import bn_pass_order
from agad.validation import (
  BOOL,
  NON_NEGATIVE,
  POSITIVE,
  STEP,
  Rule,
  check,
  choice_rule,
  flatten,
  int_rule,
  is_int,
  is_real,
  is_seq,
  need,
  num_rule,
  optional,
  type_rule,
  unknown_field,
)

GRAMMAR = "OBJECTIVE[+TRANSFORM...], e.g. 'pgd_at' or 'trades+awp'"


def known_names() -> str:
  n = registry.names()
  return f"objectives: {', '.join(n['objectives'])}; transforms: {', '.join(n['transforms'])}"


def _sites_ok(v, *, empty: bool) -> bool:
  if isinstance(v, str):
    return bool(v)
  return is_seq(v) and (empty or bool(v)) and all(isinstance(s, str) and s for s in v)


def _bn_order_ok(v) -> bool:
  try:
    return isinstance(v, str) and bool(bn_pass_order(v))
  except ValueError:
    return False


def _ratios_ok(v) -> bool:
  try:
    return (
      isinstance(v, str) and bool(v.strip()) and bool(registry.find("afa_stage2").parse_ratios(v))
    )
  except ValueError:
    return False


def field_rules() -> dict[str, Rule]:
  """``{field name or "<defense>.<field>": Rule}`` for the fields of every defense here."""
  afa, stage2, atat, alp = (registry.find(n) for n in ("afa", "afa_stage2", "atat", "alp"))
  sites = "a tuple of site names, e.g. ('features',)"
  return {
    "attack_bn": optional(choice_rule(("eval", "batch")), "config.attack.bn"),
    "random_start": optional(
      choice_rule(("uniform", "normal", "none")), "config.attack.random_start"
    ),
    "bn_updates": Rule(
      _bn_order_ok, "comma-separated passes naming 'clean' and 'adv', e.g. 'clean,adv,clean'"
    ),
    "steps": optional(int_rule(1), "config.attack.steps"),
    "step_size": optional(POSITIVE, "config.attack.step_size"),
    "again.step_size": num_rule(0, what=" (0 = config.attack.step_size)"),
    **{
      k: NON_NEGATIVE
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
      k: POSITIVE
      for k in ("proxy_lr", "mixup_alpha", "tau", "adaptive_tau_backward", "hff_eps", "eps_max")
    },
    "warmup_steps": int_rule(0),
    "label_smoothing": num_rule(0, 1, hi_open=True),
    "smoothing": choice_rule(attack_losses.SMOOTHING),
    "alpha": num_rule(0, 1),
    "width": int_rule(1),
    "wg_width": int_rule(1),
    "num_branches": int_rule(2),
    "base": choice_rule(afa.BASES),
    "clean_in_branch": choice_rule(afa.CLEAN_MODES),
    "loss_reduction": choice_rule(afa.REDUCTIONS),
    "wg_per": choice_rule(stage2.WG_PERS),
    "wg_out": choice_rule(WG_OUTS),
    "keep": Rule(
      lambda v: is_seq(v) and len(v) == 2 and all(is_int(k) for k in v),
      "two branch indices, e.g. (0, -1)",
    ),
    "ladder": Rule(
      lambda v: is_seq(v) and all(is_real(f) for f in v),
      "num_branches fractions of attack.eps, from 0, increasing, e.g. (0, 0.125, 0.25, 0.5, 1)",
    ),
    "adaptive_ratios": Rule(
      _ratios_ok, "comma-separated 'CE:BCE' weight pairs >= 0, e.g. '10:1,1:10'"
    ),
    "variant": choice_rule(atat.VARIANTS),
    "cam_norm": choice_rule(atat.CAM_NORMS),
    "cam_scale": choice_rule(atat.CAM_SCALES),
    "student_start": choice_rule(atat.STARTS),
    "student_relu": choice_rule(atat.STUDENT_RELU),
    "target": choice_rule(alp.TARGETS),
    "schedule": choice_rule(("none",), what=" (the paper's gradual schedule is not implemented)"),
    "site": Rule(lambda v: isinstance(v, str) and bool(v), "one site name, e.g. 'features'"),
    "sites": Rule(lambda v: _sites_ok(v, empty=False), "a non-empty " + sites[2:]),
    "again.sites": Rule(
      lambda v: _sites_ok(v, empty=True), sites + "; () = the model's default sites"
    ),
    "atat.sites": Rule(
      lambda v: _sites_ok(v, empty=True),
      sites + "; () only with variant='code_cifar10' or 'logit_mse'",
    ),
    "teacher.workdir": Rule(lambda v: isinstance(v, str), "the teacher's training workdir"),
    "teacher.step": STEP,
    **{k: BOOL for k in ("hff", "rec_bn_relu", "mart_term", "freeze_stats", "independent_mixing")},
  }


def check_spec(spec: Any) -> list[str]:
  """``config.objective.name``: ``OBJECTIVE[+TRANSFORM...]`` of known names, none empty
  (``"trades++fsr"``) or repeated (``"trades+awp+awp"``); returns the names."""
  field = "objective.name"
  need(isinstance(spec, str) and bool(spec.strip()), field, spec, f"{GRAMMAR}; {known_names()}")
  parts = [p.strip() for p in spec.split("+")]
  need(all(parts), field, spec, f"{GRAMMAR}: an empty name between '+' signs; {known_names()}")
  repeated = sorted({p for p in parts if parts.count(p) > 1})
  need(not repeated, field, spec, f"{GRAMMAR}: {repeated} appear(s) twice; {known_names()}")
  try:
    registry.parse(spec)
  except ValueError as e:
    raise ValueError(f"config.{field}={spec!r} is invalid: {e}") from None
  return parts


def _cross_field(name: str, merged: dict) -> None:
  if name == "afa":
    k, ladder = merged["num_branches"], [float(f) for f in merged["ladder"]]
    need(
      len(ladder) == k and ladder[0] == 0 and all(b > a for a, b in zip(ladder, ladder[1:])),
      "objective.afa.ladder",
      merged["ladder"],
      f"num_branches={k} fractions of attack.eps, from 0, increasing, e.g. (0, 0.125, 0.25, 0.5, 1)",
    )
  if name == "afa_stage2":
    k, keep = merged["num_branches"], merged["keep"]
    need(
      all(-k <= i < k for i in keep) and len({i % k for i in keep}) == 2,
      "objective.afa_stage2.keep",
      keep,
      f"two different branch indices in [-{k}, {k}) (num_branches={k}), e.g. (0, -1)",
    )
    need(
      merged["wg_per"] == "layer" or merged["wg_out"] == "scalar",
      "objective.afa_stage2.wg_out",
      merged["wg_out"],
      "scalar with wg_per='stage' (channel needs wg_per='layer')",
    )
  if name == "atat":
    losses = registry.find("atat").LOSSES
    need(
      losses.get(merged["variant"]) == "logit_mse" or bool(merged["sites"]),
      "objective.atat.sites",
      merged["sites"],
      f"a non-empty tuple of site names, e.g. ('features',): variant "
      f"{merged['variant']!r} transfers Grad-CAM maps",
    )


def check_objective(config: Any) -> list[str]:
  """``config.objective``: the spec (:func:`check_spec`), no sub-config for an unknown
  name, and every field of each name of the spec; returns the spec's names."""
  names = check_spec(config.objective.name)
  rules = field_rules()
  objective = config.objective
  for key in objective.keys():
    if key == "name":
      continue
    value = objective[key]
    try:
      registry.find(key)
    except ValueError:
      need(
        False,
        f"objective.{key}",
        value,
        "no such objective or defense (fields: name, <name>.* "
        f"for a name of the spec); {known_names()}",
      )
    need(
      isinstance(value, (dict, ml_collections.ConfigDict)),
      f"objective.{key}",
      value,
      "a sub-config of the objective's fields (config.objective.<name>.<field>)",
    )
  for name in names:
    defaults = flatten(registry.defaults(name))
    given = flatten(objective.get(name) or {})
    for path, value in given.items():
      if path not in defaults:
        unknown_field(defaults, path, value, root=f"config.objective.{name}")
      rule = rules.get(f"{name}.{path}") or rules.get(path) or rules.get(path.split(".")[-1])
      check(rule or type_rule(defaults[path]), f"objective.{name}.{path}", value)
    _cross_field(name, {**defaults, **given})
    module_check = getattr(registry.find(name), "_config", None)
    if callable(module_check):  # the defense's own checks
      module_check(config)
  return names
