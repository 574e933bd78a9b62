"""Imports flow one way (WORKSPACE.md): a lower room never imports a higher one, no
modules import each other (not even through imports inside functions), an import inside a
function says why it is not at the top of its file, and long functions say why they are."""

import ast
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# room -> rooms it must never import (directly or lazily inside a function).
FORBIDDEN = {
  "agad/checkpoint": ("agad.", "configs", "launch"),
  "agad/sharding.py": ("agad.", "configs", "launch"),
  "agad/data": (
    "agad.models",
    "agad.attacks",
    "agad.objectives",
    "agad.defenses",
    "agad.training",
    "agad.evaluation",
    "agad.api",
    "configs",
    "launch",
  ),
  "agad/models": (
    "agad.attacks",
    "agad.objectives",
    "agad.defenses",
    "agad.training",
    "agad.evaluation",
    "agad.api",
    "configs",
    "launch",
  ),
  "agad/attacks": (
    "agad.models",
    "agad.objectives",
    "agad.defenses",
    "agad.training",
    "agad.evaluation",
    "agad.api",
    "configs",
    "launch",
  ),
  "agad/objectives": (
    "agad.defenses",
    "agad.training",
    "agad.evaluation",
    "agad.api",
    "configs",
    "launch",
  ),
  "agad/defenses": ("agad.training", "agad.evaluation", "agad.api", "configs", "launch"),
  "agad/training": ("agad.evaluation", "configs", "launch"),
  "agad/evaluation": ("agad.training", "configs", "launch"),
  "agad/api.py": ("agad.training", "agad.evaluation", "configs", "launch"),
  # PyTorch checkpoints: the backbones' names and shapes only.
  "agad/interop": (
    "agad.data",
    "agad.attacks",
    "agad.attention",
    "agad.objectives",
    "agad.defenses",
    "agad.training",
    "agad.evaluation",
    "agad.api",
    "configs",
    "launch",
  ),
}


def _module_name(path):
  rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
  return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path):
  """``(imported name, line, node)`` for every import of ``path``, nested ones included;
  relative imports are resolved against the module's package."""
  tree = ast.parse(open(path).read(), path)
  package = _module_name(path).split(".")
  if not path.endswith("__init__.py"):
    package = package[:-1]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, node.lineno, node
    elif isinstance(node, ast.ImportFrom):
      module = node.module or ""
      if node.level:
        base = package[: len(package) - (node.level - 1)]
        module = ".".join(base + ([module] if module else []))
      yield module, node.lineno, node
      for alias in node.names:  # `from agad import training`
        yield f"{module}.{alias.name}", node.lineno, node


def _files(room):
  full = os.path.join(REPO, room)
  if full.endswith(".py"):
    return [full]
  return [os.path.join(d, f) for d, _, fs in os.walk(full) for f in fs if f.endswith(".py")]


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_rooms_import_only_downwards(room):
  bad = []
  own = room[:-3] if room.endswith(".py") else room
  own = own.replace("/", ".")
  for path in _files(room):
    for name, line, _ in _imports(path):
      if name == own or name.startswith(own + "."):  # a package's own modules
        continue
      if any(
        name == f.rstrip(".") or name.startswith(f if f.endswith(".") else f + ".") or name == f
        for f in FORBIDDEN[room]
      ):
        bad.append(f"{os.path.relpath(path, REPO)}:{line} imports {name}")
  assert not bad, "\n".join(bad)


def test_the_training_loop_names_no_objective_or_defense():
  names = [
    "standard",
    "pgd_at",
    "trades",
    "mart",
    "alp",
    "iat",
    "awp",
    "cas",
    "fsr",
    "again",
    "atat",
    "agkd",
    "afa",
  ]
  for path in _files("agad/training"):
    source = open(path).read()
    found = [n for n in names if f'"{n}"' in source or f"'{n}'" in source]
    assert not found, f"{os.path.relpath(path, REPO)} names {found}"


# Statement lines of a module (see _statement_lines), nested functions included: about 420
# lines of code. Counted by statements so that the formatter's wrapping does not move it.
MODULE_STATEMENTS = 250


def test_modules_stay_small():
  big = [
    (os.path.relpath(p, REPO), n)
    for p in _files("agad")
    if (n := len(_statement_lines(ast.parse(open(p).read()).body, nested=True))) > MODULE_STATEMENTS
  ]
  assert not big, f"modules over {MODULE_STATEMENTS} statement lines (~420 lines of code): {big}"


def _graph():
  """``{module: {agad modules it imports}}`` over every module of ``agad/``."""
  modules = {_module_name(p): p for p in _files("agad")}

  def resolve(name):  # `agad.defenses.cas.CASPlugin` -> `agad.defenses.cas`
    while name and name not in modules:
      name = name.rpartition(".")[0]
    return name

  graph = {}
  for module, path in modules.items():
    targets = {resolve(name) for name, _, _ in _imports(path) if name.split(".")[0] == "agad"}
    # A module importing its own package (``from agad.defenses import _registry`` in
    # ``agad.defenses.cas``) reads the package's other modules, not the package back.
    graph[module] = {t for t in targets if t and t != module and not module.startswith(t + ".")}
  return graph


def _cycles(graph):
  """The strongly connected components of ``graph`` with more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  limit = sys.getrecursionlimit()
  sys.setrecursionlimit(max(limit, 10_000))
  try:
    for v in sorted(graph):
      if v not in index:
        visit(v)
  finally:
    sys.setrecursionlimit(limit)
  return found


def test_no_import_cycles_even_through_function_level_imports():
  cycles = _cycles(_graph())
  assert not cycles, "modules that import each other: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_sees_a_loop_and_only_a_loop():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


# Functions of agad/ longer than LONGEST_BODY statement lines (lines where a statement starts,
# so the count does not depend on how the formatter wraps long calls; without the docstring
# and without the bodies of nested functions, which are measured on their own), each with the
# reason it stays one function. 45 statement lines are about 60 lines of code. A new long
# function fails test_long_functions_say_why.
LONGEST_BODY = 45
LONG_FUNCTIONS = {
  "agad/checkpoint/__init__.py:_select": "the one rule for 'best' / 'latest' / an explicit step over intact and damaged "
  "checkpoints; every branch names the damaged and intact steps in its message"
}


def _statement_lines(nodes, nested=False):
  """Lines where a statement of ``nodes`` starts; with ``nested=False``, not inside the bodies
  of functions defined in them (their ``def`` line counts)."""
  lines, todo = set(), list(nodes)
  while todo:
    node = todo.pop()
    if isinstance(node, ast.stmt):
      lines.add(node.lineno)
    if nested or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      todo.extend(ast.iter_child_nodes(node))
  return lines


def _long_functions():
  """``{"path:qualified name": statement lines}`` of the functions of agad/ over LONGEST_BODY."""
  found = {}
  for path in _files("agad"):
    rel = os.path.relpath(path, REPO)

    def visit(node, prefix):
      for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
          body = child.body
          if (
            len(body) > 1
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
          ):
            body = body[1:]
          lines = len(_statement_lines(body))
          if lines > LONGEST_BODY:
            found[f"{rel}:{prefix}{child.name}"] = lines
          visit(child, f"{prefix}{child.name}.")
        elif isinstance(child, ast.ClassDef):
          visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(open(path).read(), path), "")
  return found


def test_statement_lines_skip_nested_functions_and_wrapping():
  source = (
    "def f(a):\n  '''doc'''\n  x = g(a,\n        1)\n  def inner():\n    return 1\n  return x\n"
  )
  (func,) = ast.parse(source).body
  assert sorted(_statement_lines(func.body[1:])) == [3, 5, 7]
  assert sorted(_statement_lines(func.body[1:], nested=True)) == [3, 5, 6, 7]


def test_long_functions_say_why():
  """No library function over ~60 lines unless LONG_FUNCTIONS says why; an entry whose
  function got shorter (or went away) is removed."""
  found = _long_functions()
  unexplained = {k: v for k, v in found.items() if k not in LONG_FUNCTIONS}
  assert not unexplained, (
    f"functions over {LONGEST_BODY} lines: {unexplained}; split them into "
    "named steps, or add them to LONG_FUNCTIONS with the reason"
  )
  stale = sorted(set(LONG_FUNCTIONS) - set(found))
  assert not stale, f"LONG_FUNCTIONS lists functions that are no longer long: {stale}"
  assert all(len(reason) > 40 for reason in LONG_FUNCTIONS.values())


def _function_level_imports(path):
  """``(line, source)`` of every import inside a function body of ``path``."""
  tree = ast.parse(open(path).read(), path)
  found = {}
  for func in ast.walk(tree):
    if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for node in ast.walk(func):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
          found[node.lineno] = ast.unparse(node)
  return sorted(found.items())


def test_imports_inside_functions_say_why():
  """Imports belong at the top of their file; one inside a function (an optional or heavy
  dependency, a lazy entry point) carries a comment on its line or the line above."""
  bare = []
  for path in _files("agad"):
    lines = open(path).read().splitlines()
    for line, source in _function_level_imports(path):
      here, above = lines[line - 1], lines[line - 2] if line > 1 else ""
      if "#" not in here and not above.strip().startswith("#"):
        bare.append(f"{os.path.relpath(path, REPO)}:{line} {source}")
  assert not bare, "imports inside functions without a reason beside them:\n" + "\n".join(bare)
