"""Smoke runs of launch.evaluate (every preset) and launch.compare on the session's shared
smoke checkpoint (``smoke_workdir``, conftest.py); registered in tests/docs_commands_test.py."""

import glob
import json
import os

import pytest

from tests.smoke import attacks, copy_workdir, needs_data, reports, run_chain, run_module, tail


@needs_data
@pytest.mark.slow
def test_evaluate_every_preset_then_compare(smoke_workdir, tmp_path):
  """launch.evaluate with every preset on the smoke checkpoint, in one process, on the first 2
  test images: the smoke model misclassifies both, so AutoAttack's stages have no point left
  to attack (one robust point costs ~30-50 s of AA on this CPU; the stages themselves are
  tested in attacks_autoattack_test / evaluation_test), and one N lets the presets share
  compiles and cached rows. Then launch.compare on the first and the last checkpoint (pgd,
  8 images, so the two models differ somewhere)."""
  workdir = copy_workdir(smoke_workdir, tmp_path / "run")
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  first, last = tmp_path / "first", tmp_path / "last"
  base = [f"--workdir={workdir}", "--step=best"]
  runs = [
    [*base, "--preset=pgd", "--num_examples=2"],
    [*base, "--preset=table", "--num_examples=2"],
    [*base, "--preset=table_aa", "--num_examples=2"],
    [*base, "--preset=autoattack", "--num_examples=2"],
    [*base, "--preset=ladder", "--num_examples=2", f"--surrogate={smoke_workdir}"],
    [*base, "--preset=full", "--num_examples=2"],
    [
      f"--workdir={workdir}",
      f"--step={steps[0]}",
      "--preset=pgd",
      "--num_examples=8",
      f"--output={first}",
    ],
    [
      f"--workdir={workdir}",
      f"--step={steps[-1]}",
      "--preset=pgd",
      "--num_examples=8",
      f"--output={last}",
    ],
  ]
  out = run_chain("launch.evaluate", runs)
  assert out.returncode == 0, tail(out)
  assert out.stdout.count("[chain] ok") == len(runs)
  eval_dir = os.path.join(workdir, "eval")
  want = {
    "pgd": ["clean", "pgd-3"],
    "table": ["clean", "pgd-3", "cw-30"],
    "table_aa": ["clean", "pgd-3", "cw-30", "autoattack-standard"],
    "autoattack": ["clean", "autoattack-standard"],
    "ladder": [
      "clean",
      "fgsm",
      "pgd-3",
      "pgd-3@eps=0.0125",
      "pgd-3@eps=0.025",
      "pgd-3@eps=0.05",
      "cw-30",
      "transfer-pgd-3",
      "autoattack-standard",
    ],
  }
  for preset, names in want.items():
    (path,) = reports(eval_dir, preset)
    assert attacks(path) == names, (preset, attacks(path))
  (full,) = reports(eval_dir, "full")
  assert {
    "fgsm",
    "pgd-100",
    "pgd-3x5",
    "mim-3",
    "cw-30",
    "autoattack-standard",
    "pgd-3@eps=0.5",
    "pgd-1",
    "pgd-10",
  } <= set(attacks(full))
  for path in glob.glob(os.path.join(eval_dir, "report_step*.json")):
    report = json.load(open(path))
    assert report["n"] == 2, path
    assert report["worst_case"]["accuracy"] <= min(r["accuracy"] for r in report["records"]), path
    assert os.path.exists(path[:-5] + ".md") and os.path.exists(path[:-5] + ".npz"), path
  # AutoAttack ran once (table_aa); the autoattack, ladder and full presets read its cached rows.
  for preset in ("autoattack", "ladder", "full"):
    (path,) = reports(eval_dir, preset)
    aa = next(r for r in json.load(open(path))["records"] if r["attack"] == "autoattack-standard")
    assert aa["cached_chunks"] == 1, (preset, aa)

  (a,), (b,) = reports(str(last), "pgd"), reports(str(first), "pgd")
  out = run_module(
    [
      "launch.compare",
      f"--defense={a},{a}",
      f"--base={b},{b}",
      "--preset=pgd",
      "--num_examples=8",
      f"--output={tmp_path / 'cmp.json'}",
    ]
  )
  assert out.returncode == 0, tail(out)
  result = json.load(open(tmp_path / "cmp.json"))
  assert [p["n"] for p in result["pairs"]] == [8, 8] and result["pooled"]["seeds"] == 2
  acc = lambda path: json.load(open(path))["worst_case"]["accuracy"]
  assert result["pairs"][0]["diff"] == pytest.approx(acc(a) - acc(b))
  assert "pooled over 2 seed pair(s)" in out.stdout
