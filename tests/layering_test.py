"""Imports flow one way (DESIGN.md): a lower room never imports a higher one."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# room -> rooms it must never import (directly or lazily inside a function).
FORBIDDEN = {
    "agad/checkpoint": ("agad.", "configs", "launch"),
    "agad/sharding.py": ("agad.", "configs", "launch"),
    "agad/data": ("agad.models", "agad.attacks", "agad.objectives", "agad.defenses", "agad.training",
                  "agad.evaluation", "agad.api", "configs", "launch"),
    "agad/models": ("agad.attacks", "agad.objectives", "agad.defenses", "agad.training", "agad.evaluation",
                    "agad.api", "configs", "launch"),
    "agad/attacks": ("agad.models", "agad.objectives", "agad.defenses", "agad.training", "agad.evaluation",
                     "agad.api", "configs", "launch"),
    "agad/objectives": ("agad.defenses", "agad.training", "agad.evaluation", "agad.api", "configs", "launch"),
    "agad/defenses": ("agad.training", "agad.evaluation", "configs", "launch"),
    "agad/training": ("agad.evaluation", "configs", "launch"),
    "agad/evaluation": ("agad.training", "configs", "launch"),
    "agad/api.py": ("agad.training", "agad.evaluation", "configs", "launch"),
    # PyTorch checkpoints: the backbones' names and shapes only.
    "agad/interop": ("agad.data", "agad.attacks", "agad.attention", "agad.objectives", "agad.defenses",
                     "agad.training", "agad.evaluation", "agad.api", "configs", "launch"),
}


def _imports(path):
  tree = ast.parse(open(path).read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, node.lineno
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      yield node.module, node.lineno
      for alias in node.names:  # `from agad import training`
        yield f"{node.module}.{alias.name}", node.lineno


def _files(room):
  full = os.path.join(REPO, room)
  if full.endswith(".py"):
    return [full]
  return [os.path.join(d, f) for d, _, fs in os.walk(full) for f in fs if f.endswith(".py")]


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_rooms_import_only_downwards(room):
  bad = []
  for path in _files(room):
    for name, line in _imports(path):
      if any(name == f.rstrip(".") or name.startswith(f if f.endswith(".") else f + ".") or name == f
             for f in FORBIDDEN[room]):
        bad.append(f"{os.path.relpath(path, REPO)}:{line} imports {name}")
  assert not bad, "\n".join(bad)


def test_the_training_loop_names_no_objective_or_defense():
  names = ["standard", "pgd_at", "trades", "mart", "alp", "iat", "awp", "cas", "fsr", "again", "atat",
           "agkd", "afa"]
  for path in _files("agad/training"):
    source = open(path).read()
    found = [n for n in names if f'"{n}"' in source or f"'{n}'" in source]
    assert not found, f"{os.path.relpath(path, REPO)} names {found}"


def test_modules_stay_small():
  big = [(os.path.relpath(p, REPO), n) for p in _files("agad")
         if (n := sum(1 for _ in open(p))) > 420]
  assert not big, f"modules over ~400 lines: {big}"
