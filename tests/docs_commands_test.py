"""Every command the documentation shows is run by a smoke test.

``test_every_documented_command_has_a_smoke_run`` extracts the commands of README.md,
WORKSPACE.md and docs/**/*.md (fenced and indented code blocks, inline code spans, even
wrapped over lines, and prose): ``python -m MODULE ...`` (any interpreter path:
``.venv/bin/python``, ``python3``), ``python tools/x.py ...``, ``bash launch/x.sh ...`` (with
``VAR=value`` prefixes), and a bare ``launch.X --flag ...`` span. Each command is reduced to a
*signature*: the program plus the options that choose a different code path (``signature``
below). Every signature must be in ``SMOKE_RUNS`` (signature -> the test(s) that run it) or in
``EXEMPT`` (dev-only commands that need the separate torch environment ``.venv-parity``, each
with its reason). A new doc line with a new program or code path fails here until a smoke run
is registered; a table entry naming a test that does not exist fails as well.

The smoke runs that no other test did are in tests/launch_{evaluate,train,scripts,tools}_test.py
(separate files so that pytest-xdist's ``--dist=loadfile`` spreads them over the workers), on
the session's shared smoke checkpoint (``smoke_workdir`` in conftest.py) with the smallest
settings, several commands per process where a launcher allows it (tests/launch_chain.py).
"""

from __future__ import annotations

import ast
import glob
import os
import re
from dataclasses import dataclass, field

from tests.smoke import REPO

# ---------------------------------------------------------------- extraction

_FENCE = re.compile(r"^\s*(```|~~~)")
_ENV = r"(?P<env>(?:[A-Z_][A-Z0-9_]*=(?:\"[^\"]*\"|'[^']*'|[^\s\"'`]+)\s+)*)"
_START = re.compile(
  r"(?:(?<=[\s\"'(`=])|^)"
  + _ENV
  + r"(?:(?:[\w.~/$-]*/)?(?:python3?(?:\.\d+)?|\$\{?PYTHON\w*\}?)\s+"
  r"(?:-m\s+(?P<mod>[A-Za-z_]\w*(?:\.\w+)*(?:/\w+)*)|(?P<pyscript>(?:\./)?(?:tools|launch)/[\w./-]+\.py))"
  r"|(?:bash|sh)\s+(?P<sh>(?:\./)?launch/[\w./-]+\.sh)"
  r"|(?P<bare>launch(?:\.\w+)+)(?=\s+\[?--))"
)
# Shell words that end a command (the rest of the fragment is prose or another command).
_STOP = {"&&", "||", ";", "|", "then", "or", "and", "(or"}


@dataclass
class Command:
  where: str  # file:line
  program: str  # launch.evaluate | bash launch/main_job.sh | tools/x.py
  options: dict = field(default_factory=dict)  # name -> values ("" for a bare --flag)
  env: dict = field(default_factory=dict)  # VAR=value prefixes
  text: str = ""
  args: list = field(default_factory=list)  # every word after the program


def code_fragments(text: str) -> list[tuple[int, str]]:
  """``(line, text)`` of every fenced or indented code line, every inline code span (a span
  may wrap lines inside a paragraph) and every prose line with its spans blanked out."""
  out, prose, fenced, continued = [], [], False, None
  for i, line in enumerate(text.split("\n"), 1):
    if _FENCE.match(line):
      fenced, continued = not fenced, None
    elif fenced or line.startswith(("    ", "\t")):
      if continued:  # the line before ended with a backslash: one shell command
        line = continued[1] + " " + line.strip()
        i = continued[0]
        out.pop()
      out.append((i, line.rstrip().removesuffix("\\")))
      continued = (i, out[-1][1]) if line.rstrip().endswith("\\") else None
    else:
      prose.append((i, line))
      continued = None
  paragraphs, current, prev = [], [], None
  for i, line in prose:
    if not line.strip() or (prev is not None and i != prev + 1):
      paragraphs.append(current)
      current = []
    if line.strip():
      current.append((i, line))
    prev = i
  paragraphs.append(current)
  span = re.compile(r"(`+)(.+?)\1", re.S)
  for para in filter(None, paragraphs):
    first, joined = para[0][0], "\n".join(line for _, line in para)
    for m in span.finditer(joined):
      out.append((first + joined.count("\n", 0, m.start()), m.group(2).replace("\n", " ")))
    for k, line in enumerate(
      span.sub(lambda m: " " * len(m.group(0).replace("\n", "")), joined).split("\n")
    ):
      out.append((first + k, line))
  return out


def parse_commands(text: str, name: str = "<doc>") -> list[Command]:
  commands = []
  for line, fragment in code_fragments(text):
    fragment = fragment.replace("\\|", "|")  # an escaped pipe inside a Markdown table cell
    for m in _START.finditer(fragment):
      if m.group("mod"):
        head, *alternatives = m.group("mod").split("/")  # launch.train/evaluate/benchmark
        parent = head.rsplit(".", 1)[0] + "." if "." in head else ""
        programs = [head] + [parent + a for a in alternatives]
      elif m.group("sh"):
        programs = ["bash " + m.group("sh").removeprefix("./")]
      else:
        programs = [(m.group("bare") or m.group("pyscript")).removeprefix("./")]
      env = {
        e.group(1): e.group(2).strip("\"'")
        for e in re.finditer(r"([A-Z_][A-Z0-9_]*)=(\"[^\"]*\"|'[^']*'|\S+)", m.group("env") or "")
      }
      rest = fragment[m.end() :]
      following = _START.search(rest)
      if following:
        rest = rest[: following.start()]
      options, words, pending = {}, [], None
      for token in rest.split():
        if token in _STOP:
          break
        closes_quote = token.count('"') % 2 == 1 or token.count("'") % 2 == 1
        token = token.strip("\"'`[](),")
        words.append(token)
        if token.startswith("--") and len(token) > 2:
          key, eq, value = token[2:].partition("=")
          options.setdefault(key, []).extend(value.split("|") if value else [""])
          pending = None if eq else key
        elif pending and token and not token.startswith("-"):  # --flag VALUE (absl takes both)
          options[pending] = [v for v in options[pending] if v] + token.split("|")
          pending = None
        else:
          pending = None
        if closes_quote:  # the end of a quoted command (gcloud ... --command="...")
          break
      text_ = " ".join([m.group(0).strip(), *words])
      commands += [Command(f"{name}:{line}", p, options, env, text_, words) for p in programs]
  return commands


def doc_files() -> list[str]:
  files = [os.path.join(REPO, f) for f in ("README.md", "WORKSPACE.md")]
  files += sorted(glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True))
  return [f for f in files if os.path.exists(f)]


def documented_commands() -> list[Command]:
  return [c for f in doc_files() for c in parse_commands(open(f).read(), os.path.relpath(f, REPO))]


# ---------------------------------------------------------------- signatures


def _objective(config_values: list[str]) -> str:
  """The objective spec of ``--config=FILE:MODEL,OBJECTIVE[,smoke]`` ('' when not given)."""
  for value in config_values:
    _, _, arg = value.partition(":")
    parts = [p.strip() for p in arg.split(",") if p.strip() and p.strip() != "smoke"]
    if len(parts) >= 2:
      return parts[1]
  return ""


def signature(c: Command) -> list[str]:
  """Program + the options that select a different code path (alternatives ``a|b`` expand).

  launch.train: the objective spec of ``--config`` (a defense's objective, composition or
    AFA stage; models and datasets are covered by models_*/data_* tests and one launcher run),
    ``--config.init.workdir`` (a student / stage II starting from another run) and
    ``--distributed``. Objective-field overrides (variants, bases) are covered by each
    defense's own tests.
  launch.evaluate: ``--preset`` (absent: the run's saved eval.preset) and ``--surrogate``.
  Both: ``--coordinator_address`` (an explicit multi-process start).
  launch.benchmark: ``--mode`` (absent: train). launch.attention: ``--compare``.
  launch.prepare_data: ``--dataset``. Everything else: the program alone.
  """
  o, p = c.options, c.program
  if p == "launch.train":
    sig = " ".join(
      filter(
        None,
        [
          "launch.train",
          _objective(o.get("config", [])),
          "--config.init.workdir" if "config.init.workdir" in o else "",
          "--distributed" if "distributed" in o else "",
          "--coordinator_address" if "coordinator_address" in o else "",
        ],
      )
    )
    return [sig]
  if p == "launch.evaluate":
    surrogate = " --surrogate" if "surrogate" in o else ""
    surrogate += " --coordinator_address" if "coordinator_address" in o else ""
    return (
      [f"launch.evaluate --preset={v}{surrogate}" for v in o["preset"]]
      if "preset" in o
      else [f"launch.evaluate{surrogate}"]
    )
  if p == "launch.benchmark":
    return [f"launch.benchmark --mode={v}" for v in o.get("mode", ["train"])]
  if p == "launch.attention":
    return ["launch.attention --compare" if "compare" in o else "launch.attention"]
  if p == "launch.prepare_data":
    return [f"launch.prepare_data --dataset={v}" for v in o.get("dataset", [""])]
  return [p]


# ---------------------------------------------------------------- the table

_AFA = "tests/defenses_afa_test.py::test_stage_one_then_stage_two_fashion_mnist_smoke_through_the_trainer"
_ATAT = "tests/defenses_atat_test.py::test_fashion_mnist_two_command_pipeline_starts"
_EVALUATE = "tests/launch_evaluate_test.py::test_evaluate_every_preset_then_compare"
_FSR = "tests/defenses_fsr_test.py::test_fsr_and_its_compositions_train_through_the_loop"
_LAUNCH = "tests/launch_test.py::test_train_then_evaluate_smoke"
_SCRIPTS = "tests/launch_scripts_test.py"
_TOOLS = "tests/launch_tools_test.py"
_TRAIN = "tests/launch_train_test.py::test_train_pipelines_distributed_and_afa_branches"
_TORCH_IO = "tests/interop_torch_test.py::test_import_evaluate_flags_finetune_export_smoke"
_MULTIHOST = "tests/multihost_test.py::test_two_processes_equal_one_and_survive_a_sigkill"

# Documented-command signature -> the smoke test(s) that run it.
SMOKE_RUNS = {
  "bash launch/main_job.sh": f"{_SCRIPTS}::test_main_job_sh_smoke",
  "bash launch/objectives_table.sh": f"{_SCRIPTS}::test_objectives_table_sh_smoke",
  "bash launch/test.sh": f"{_SCRIPTS}::test_test_sh_runs_a_test",
  "pytest": f"{_SCRIPTS}::test_test_sh_runs_a_test",  # python -m pytest FILE: what test.sh runs
  "launch.train": _LAUNCH,  # --config=FILE: the config's default objective
  "launch.train pgd_at": _LAUNCH,  # the shared smoke checkpoint (conftest.py)
  "launch.train trades+awp": _TRAIN,
  "launch.train again": f"{_SCRIPTS}::test_numerics_sweep_trains_again_under_both_code_paths",
  "launch.train --distributed": _TRAIN,
  "launch.train trades+awp --distributed": _TRAIN,  # docs/running.md's TPU pod line
  # Two processes on 127.0.0.1 (docs/multihost.md); its GPU-cluster line runs trades+awp.
  "launch.train again --coordinator_address": _MULTIHOST,
  "launch.train trades+awp --coordinator_address": (_TRAIN, _MULTIHOST),
  "launch.evaluate --preset=pgd --coordinator_address": _MULTIHOST,
  # FSR and its compositions through the Trainer (the CLI layer: the launch.train smokes above).
  "launch.train fsr": _FSR,
  "launch.train trades+fsr": _FSR,
  "launch.train mart+fsr": _FSR,
  # An out-of-tree defense (AGAD_DEFENSES_PATH) through launch.train itself.
  "launch.train toy_def": "tests/defenses_registry_test.py::test_an_out_of_tree_defense_trains_through_launch_train",
  "launch.train standard": (_TRAIN, _ATAT),  # AGKD-BML's teacher (label smoothing), ATAT's
  "launch.train agkd_bml --config.init.workdir": _TRAIN,
  "launch.train atat --config.init.workdir": _ATAT,
  # A code variant (random init, no init.workdir): the same smoke configs through the Trainer.
  "launch.train atat": "tests/defenses_atat_test.py::"
  "test_code_variants_start_from_random_init_with_the_schedule_at_the_teachers_step",
  "launch.train afa": (_TRAIN, _AFA),
  # Stage II from a stage-I run: the same smoke configs through the Trainer (launch.train's
  # own layer, flag parsing and the config checks, is run by the other launch.train smokes).
  "launch.train afa_stage2 --config.init.workdir": _AFA,
  "launch.evaluate": _LAUNCH,  # no --preset: the saved config's (pgd)
  "launch.evaluate --preset=pgd": _EVALUATE,
  "launch.evaluate --preset=table": _EVALUATE,
  "launch.evaluate --preset=table_aa": _EVALUATE,
  "launch.evaluate --preset=full": _EVALUATE,
  "launch.evaluate --preset=autoattack": _EVALUATE,
  "launch.evaluate --preset=ladder": _EVALUATE,
  "launch.evaluate --preset=ladder --surrogate": _EVALUATE,
  "launch.compare": (
    _EVALUATE,
    "tests/evaluation_compare_test.py::test_launch_compare_prints_per_seed_and_pooled",
  ),
  "launch.attention --compare": "tests/notebook_test.py::test_launch_attention_writes_figures_and_statistics",
  "launch.benchmark --mode=train": f"{_TOOLS}::test_benchmark_every_mode",
  "launch.benchmark --mode=eval": f"{_TOOLS}::test_benchmark_every_mode",
  "launch.benchmark --mode=autoattack": f"{_TOOLS}::test_benchmark_every_mode",
  "launch.prepare_data --dataset=cifar10": "tests/launch_train_test.py::test_prepare_data_paths_with_mocked_tfds",
  "launch.prepare_data --dataset=tiny_imagenet": "tests/launch_train_test.py::test_prepare_data_paths_with_mocked_tfds",
  "launch.prepare_data --dataset=svhn_cropped": "tests/launch_train_test.py::test_prepare_data_paths_with_mocked_tfds",
  "tools/afa_branches.py": _TRAIN,
  "tools/recipe_smoke.py": f"{_TOOLS}::test_recipe_smoke_runs_one_recipe",
  "tools/numerics_sweep.py": f"{_SCRIPTS}::test_numerics_sweep_trains_again_under_both_code_paths",
  "tools/chaos_train.py": "tests/launch_tools_test.py::test_chaos_train_eval_mode_smoke",
  "launch.import_torch": _TORCH_IO,
  "launch.export_torch": _TORCH_IO,
  "launch.train trades --config.init.workdir": _TORCH_IO,  # fine-tuning an imported SmallCNN
}

# Dev-only commands that need the separate torch environment (.venv-parity): never run here.
EXEMPT = {
  "tools/torch_parity.py": "builds PyTorch models (import torch) to compare logits with agad's; "
  "its make/check phases run where torch is installed",
  "bash launch/env_parity.sh": "creates .venv-parity: pip-installs torch 2.13 and pyautoattack "
  "(internet, ~1-3 GB); dev-only, never an agad dependency",
  "tools/parity_autoattack.py": "imports torch and pyautoattack, which exist only in .venv-parity "
  "(bash launch/env_parity.sh)",
  "tools/aa_timing_compare.py": "runs tools/parity_autoattack.py (torch + pyautoattack) under "
  ".venv-parity for two revisions",
}
# What marks a program as needing the torch environment (checked for every exemption).
_TORCH_ENV_MARKERS = ("import torch", ".venv-parity", "pyautoattack")


def _tests_of(entry) -> tuple[str, ...]:
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _test_exists(node_id: str) -> bool:
  path, *names = node_id.split("::")
  full = os.path.join(REPO, path)
  if not os.path.exists(full) or not names:
    return False
  body = ast.parse(open(full).read()).body
  for name in names:
    match = [n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name]
    if not match:
      return False
    body = match[0].body if isinstance(match[0], ast.ClassDef) else []
  return True


def _program_source(program: str) -> str:
  if program.startswith("bash "):
    path = program[5:]
  elif program.endswith(".py"):
    path = program
  else:
    path = program.replace(".", "/") + ".py"
  full = os.path.join(REPO, path)
  return open(full).read() if os.path.exists(full) else ""


def test_every_documented_command_has_a_smoke_run():
  commands = documented_commands()
  assert len(commands) >= 10, [c.text for c in commands]  # the docs have not vanished
  missing = {}
  for c in commands:
    for sig in signature(c):
      if sig not in SMOKE_RUNS and sig not in EXEMPT:
        missing.setdefault(sig, []).append(f"{c.where}: {c.text}")
  assert not missing, (
    "documented commands without a smoke run: add a smoke test and register the signature in "
    "SMOKE_RUNS (tests/docs_commands_test.py):\n"
    + "\n".join(f"  {sig!r}\n    " + "\n    ".join(where) for sig, where in sorted(missing.items()))
  )


def test_smoke_table_names_existing_tests_and_exemptions_are_torch_only():
  absent = [
    (sig, t) for sig, entry in SMOKE_RUNS.items() for t in _tests_of(entry) if not _test_exists(t)
  ]
  assert not absent, f"SMOKE_RUNS names tests that do not exist: {absent}"
  assert not set(SMOKE_RUNS) & set(EXEMPT)
  for sig, reason in EXEMPT.items():
    assert isinstance(reason, str) and len(reason) > 20, sig
    source = _program_source(sig)
    assert any(m in source for m in _TORCH_ENV_MARKERS), (
      f"{sig} is exempt, but only commands that need the torch environment (.venv-parity) may be"
    )


def test_extraction_reads_every_form_of_command():
  doc = "\n".join(
    [
      "Run `bash launch/main_job.sh [WORKDIR]` first.",
      "",
      "    bash launch/test.sh",
      "",
      "```bash",
      'OBJECTIVES="trades mart" PRESET=table_aa bash launch/objectives_table.sh runs/x --config.seed=1',
      ".venv/bin/python -m launch.train --config=configs/cifar10.py:resnet18,trades+awp,smoke \\",
      "```",
      "| evaluate | `.venv/bin/python -m launch.evaluate --workdir=runs/x [--preset=pgd\\|full] "
      "[--surrogate=<its base>]` |",
      "A wrapped span: `python -m launch.benchmark",
      "--mode eval` and `launch.compare --defense=a --base=b` then `python3 tools/plot.py --x=1`.",
      '`gcloud ssh --command="cd agad && .venv/bin/python -m launch.train --distributed --config=... "`',
      "`python -m launch.train --config=configs/fashion_mnist.py:smallcnn,atat "
      "--config.init.workdir=runs/t` then `python tools/recipe_smoke.py`;",
      "call `python3 -m launch.train/evaluate/benchmark` directly; prose python -m launch.attention --compare=a.",
      "Not commands: `launch.evaluate`, `launch/env.sh`, `agad.load(workdir)`.",
      "",
      '    XLA_FLAGS="--a --b" \\',
      "      bash launch/test.sh tests/attacks_pgd_test.py -k linear",
    ]
  )
  commands = parse_commands(doc)
  sigs = [s for c in commands for s in signature(c)]
  assert sigs == [
    "bash launch/test.sh",
    "bash launch/objectives_table.sh",
    "launch.train trades+awp",
    "bash launch/test.sh",
    "bash launch/main_job.sh",
    "launch.evaluate --preset=pgd --surrogate",
    "launch.evaluate --preset=full --surrogate",
    "launch.benchmark --mode=eval",
    "launch.compare",
    "tools/plot.py",
    "launch.train --distributed",
    "launch.train atat --config.init.workdir",
    "tools/recipe_smoke.py",
    "launch.train",
    "launch.evaluate",
    "launch.benchmark --mode=train",
    "launch.attention --compare",
  ], sigs
  table = next(c for c in commands if c.program == "bash launch/objectives_table.sh")
  assert (
    table.env == {"OBJECTIVES": "trades mart", "PRESET": "table_aa"} and table.where == "<doc>:6"
  )
  assert table.options == {"config.seed": ["1"]}
  wrapped = next(c for c in commands if c.program == "launch.benchmark" and c.options)
  assert wrapped.where == "<doc>:10"
  continued = [c for c in commands if c.program == "bash launch/test.sh"][1]
  assert continued.where == "<doc>:17" and continued.env == {"XLA_FLAGS": "--a --b"}
  assert continued.args == ["tests/attacks_pgd_test.py", "-k", "linear"]
