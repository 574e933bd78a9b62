"""The repository speaks of the project and its code only.

Every file git knows (tracked, or new and not ignored) is scanned for words that date or
place work by how it was organised instead of by what changed: work-item or work-period
numbers ("issue 4", "#13", "session 6", "sessions 6-9", "work item"), run folders named
after them (``runs/s6/``), notes about whose machine ran what ("borrowed", "lent"),
absolute paths of one machine (``/work/...``, ``/home/...``; in the documentation also
``/tmp/...``) and package-index host names (the install scripts use pip's configured
index). Results are dated by revision and date instead.

The patterns are narrow on purpose: "session" alone stays legal (a pytest fixture scope, a
TensorFlow session), and so does "issue" as a verb or a hex colour such as ``#1f77b4``.
"""

from __future__ import annotations

import re
import subprocess

from tests.smoke import REPO

_SLASH = "/"
RULES = {
  "work-period number": r"\bsessions?\s+\d",
  "work-item number": r"\bissues?\s*#?\d|\bissue's\b",
  "work-item reference": r"(?<![\w&/=\"'])#\d+\b(?![\w-])",
  "work item / period": r"\bwork[- ](?:items?|periods?)\b",
  "whose machine": r"\b(?:borrowed|lent)\b",
  "run folder named after a work period": r"\bruns/s\d+/",
  "absolute path": _SLASH + r"(?:work|home)" + _SLASH,
  "package-index host": r"pypi\.org|pythonhosted\.org|download\.pytorch\.org|"
  r"anaconda\.(?:org|com)",
}
DOC_RULES = {"absolute /tmp path": r"(?<![\w.])" + _SLASH + "tmp" + _SLASH}
_DOC_SUFFIXES = (".md", ".rst", ".txt", ".ipynb")
_THIS = "tests/docs_hygiene_test.py"


def _files() -> list[str]:
  out = subprocess.run(
    ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
    cwd=REPO,
    capture_output=True,
    check=True,
  ).stdout
  return [f for f in out.decode().split("\0") if f and f != _THIS]


def findings(name: str, text: str) -> list[str]:
  """``'file:line: rule: excerpt'`` for every forbidden reference in ``text``."""
  rules = dict(RULES, **(DOC_RULES if name.endswith(_DOC_SUFFIXES) else {}))
  compiled = {rule: re.compile(p, re.I) for rule, p in rules.items()}
  found = []
  for i, line in enumerate(text.split("\n"), 1):
    for rule, pattern in compiled.items():
      m = pattern.search(line)
      if m:
        excerpt = line[max(0, m.start() - 30) : m.end() + 30].strip()
        found.append(f"{name}:{i}: {rule}: ...{excerpt}...")
  return found


def test_patterns_catch_what_they_should_and_nothing_else():
  bad = [
    "see issue 4's table",
    "(issue #13)",
    "fixed in #12.",
    "session 6, 2026-11-30",
    "sessions 6-9",
    "a work item",
    "on the lent H100",
    "a borrowed machine",
    "workdir /work/runs/x",
    "in /home/me/agad",
    "runs/s6/seed0/fsr",
    "pip from pypi.org",
    "files.pythonhosted.org",
    "https://download.pytorch.org/whl/cpu",
    "the issue's default",
  ]
  good = [
    '@pytest.fixture(scope="session")',
    "once per test session",
    "issue a warning",
    "colour #1f77b4",
    "&#123;",
    "runs/seed0/fsr",
    "revision 4f7a985, 2026-11-30",
    "the equivalent loss",
    "github.com/x/y#L12",
    "tf.Session()",
    "sessions of training",
    "python -m launch.train --workdir=runs/x",
  ]
  for line in bad:
    assert findings("x.md", line), line
  for line in good:
    assert not findings("x.md", line), (line, findings("x.md", line))
  assert findings("x.md", "workdir=/tmp/x") and not findings("x.py", "workdir=/tmp/x")


def test_tracked_files_carry_no_work_organisation_references():
  found = []
  for name in _files():
    try:
      with open(f"{REPO}/{name}", encoding="utf-8") as f:
        text = f.read()
    except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
      continue  # binary files (figures), or a file deleted but not yet staged
    found += findings(name, text)
  assert not found, (
    "references to how the work was organised (date results by revision and "
    "date; write relative paths; use pip's configured index):\n"
    + "\n".join(found[:60])
    + (f"\n... {len(found) - 60} more" if len(found) > 60 else "")
  )
