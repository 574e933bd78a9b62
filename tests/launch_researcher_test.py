"""The researcher's path without training: radii from one flag and fractions, the number to
quote, warnings before a conclusion, the masking check's use of AutoAttack's Square stage,
and launch.compare finding the reports that exist (all on hand-made reports, milliseconds)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from agad.evaluation import checks, compare
from agad.evaluation.report import headline, markdown
from agad.training import builders
from launch import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/fashion_mnist.py:smallcnn,pgd_at"


def _parse(*args):
  """What launch.train's flag parsing does (ml_collections reads the overrides from sys.argv)."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
  argv, saved = ["prog", f"--config={CONFIG}", *args], sys.argv
  sys.argv = argv
  try:
    fv(argv)
  finally:
    sys.argv = saved
  return fv


def test_one_radius_flag_and_fractions_for_every_float_field():
  fv = _parse(
    "--config.eps=8/255", "--config.attack.step_size=2/255", "--config.eval.step_size=0.5/255"
  )
  config = fv.config
  explicit = common.explicit_overrides(flag_values=fv)
  assert explicit == {"eps", "attack.step_size", "eval.step_size"}
  radii = common.resolve_radii(config, explicit)
  assert radii == {"attack.eps": 8 / 255, "validation.attack.eps": 8 / 255, "eval.eps": 8 / 255}
  assert (config.attack.step_size, config.eval.step_size) == (2 / 255, 0.5 / 255)
  builders.check_config(config, num_devices=1)  # the three agree: accepted
  line = common.describe_radii(config, radii)
  assert line.startswith(
    "radii: attack.eps=0.0313725 (8/255; step 0.007843 x 10), validation.attack.eps="
  )
  assert "eval.eps=0.0313725 (8/255; step 0.001961 x 20)" in line

  # A radius given explicitly too keeps its value; the mismatch check then names both.
  fv = _parse("--config.eps=8/255", "--config.eval.eps=4/255")
  radii = common.resolve_radii(fv.config, common.explicit_overrides(flag_values=fv))
  assert radii == {"attack.eps": 8 / 255, "validation.attack.eps": 8 / 255, "eval.eps": 4 / 255}
  with pytest.raises(
    ValueError, match=r"^config.eps=0.0313725 but eval.eps=0.0156863: set them to config.eps"
  ):
    builders.check_config(fv.config, num_devices=1)
  # Without --config.eps the dataset's radii stay; one changed alone names the one-flag fix.
  fv = _parse("--config.attack.eps=0.05")
  assert (
    common.resolve_radii(fv.config, common.explicit_overrides(flag_values=fv))["eval.eps"] == 0.1
  )
  with pytest.raises(ValueError, match=r"the radii differ .*set all three with one --config.eps=R"):
    builders.check_config(fv.config, num_devices=1)
  for bad in ("1/0", "a/255"):
    with pytest.raises(
      flags.Error, match=f"could not read '{bad}' as a number or a fraction like 8/255"
    ):
      _parse(f"--config.eps={bad}")


def _record(name, kind, acc, n=100, **kw):
  return {
    "attack": name,
    "kind": kind,
    "accuracy": acc,
    "stderr": math.sqrt(acc * (1 - acc) / n),
    "n": n,
    "eps": 0.1,
    **kw,
  }


def _report(records, n=100, **kw):
  worst = min(r["accuracy"] for r in records)
  return {
    "n": n,
    "eps": 0.1,
    "norm": "linf",
    "dataset": "fashion_mnist",
    "num_classes": 10,
    "records": records,
    "warnings": [],
    "sweep_steps": 20,
    "worst_case": {
      "attack": "worst-case",
      "accuracy": worst,
      "stderr": 0.04,
      "n": n,
      "over": [r["attack"] for r in records],
    },
    **kw,
  }


def test_the_worst_case_is_the_headline_and_says_when_autoattack_is_missing():
  pgd = _report([_record("clean", "clean", 0.8), _record("pgd-20", "pgd", 0.45)])
  assert headline(pgd) == (
    "worst case 45.00% +- 4.00 pp (n=100, eps 0.1; per image, robust only if every "
    "attack failed: clean, pgd-20); no AutoAttack row: a defense row needs "
    "--preset=table_aa"
  )
  aa = _report([_record("clean", "clean", 0.8), _record("autoattack-standard", "autoattack", 0.41)])
  assert headline(aa).endswith("clean, autoattack-standard)")
  aa["before_quoting"] = checks.conclusion_warnings(aa)
  text = markdown(aa).splitlines()
  assert text[2] == f"**Number to quote: {headline(aa)}**"
  assert text[4] == "**Before quoting it**" and text[6].startswith(
    "- n=100: the worst case's standard error is 4.00 pp"
  )


def test_warnings_before_a_conclusion():
  near_chance = _report([_record("clean", "clean", 0.15, n=1000)], n=1000)
  (note,) = checks.conclusion_warnings(near_chance)
  assert note.startswith("clean accuracy 15.00% is near chance (10% for 10 classes)")
  assert checks.conclusion_warnings(_report([_record("clean", "clean", 0.2, n=1000)], n=1000)) == []
  # A report written before num_classes was recorded: the dataset's.
  old = _report([_record("clean", "clean", 0.015)], n=1000, dataset="cifar100")
  del old["num_classes"]
  assert "(1% for 100 classes)" in compare.chance_note(old)

  # Paired: d has sd = se sqrt(n); a diff stands 2 se from 0 at n >= n (2 se / diff)^2.
  pair = {
    "objective_a": "trades+fsr",
    "objective_b": "trades",
    "n": 100,
    "diff": 0.02,
    "stderr": 0.015,
    "report_a": "a.json",
    "report_b": "b.json",
    "chance_b": "clean accuracy 12.00% is near chance",
  }
  got = compare.warnings([pair], compare.pooled([pair]))
  assert got == [
    "b.json: clean accuracy 12.00% is near chance",
    "trades+fsr vs trades: n=100 is below the ~225 images a 2.00 pp difference needs to stand "
    "two paired standard errors from 0: evaluate more images (--num_examples)",
    "one seed pair: the paired error is test-sampling noise of two fixed models; whether the "
    "difference survives retraining is unknown (train and evaluate a second seed of each)",
  ]
  big = dict(pair, n=400, stderr=0.0075, chance_b=None)  # the same paired sd (0.15), 4x the images
  assert compare.warnings([big, big], compare.pooled([big, big])) == []


def test_autoattack_square_stage_counts_as_the_black_box_check():
  stages = {"apgd-ce": 0.50, "apgd-t": 0.48, "fab-t": 0.48, "square": 0.45}
  flag = "Square lowered robust accuracy by 3.00% after the white-box attacks: gradient masking?"
  aa = _record(
    "autoattack-standard", "autoattack", 0.45, version="standard", per_attack=stages, flags=[flag]
  )
  report = _report([_record("clean", "clean", 0.8), _record("pgd-20", "pgd", 0.5, steps=20), aa])
  assert not any("black-box" in c for c in checks.not_applicable(report))
  assert f"autoattack-standard: {flag}" in checks.report_warnings(report)  # AutoAttack's own check
  no_stages = {k: v for k, v in aa.items() if k != "per_attack"}  # per-stage results not cached
  assert not any("black-box" in c for c in checks.not_applicable(_report([no_stages])))
  for without in (
    dict(no_stages, version="rand"),
    dict(no_stages, version="custom", attacks=["apgd-ce"]),
  ):
    (needs,) = [c for c in checks.not_applicable(_report([without])) if "black-box" in c]
    assert "or an AutoAttack row whose Square stage runs after its white-box stages" in needs


def _eval_dir(tmp_path, run, files):
  folder = tmp_path / run / "eval"
  folder.mkdir(parents=True)
  for name, acc in files.items():
    n = 100
    robust = np.arange(n) < round(acc * n)
    report = _report(
      [_record("clean", "clean", 0.9), _record("autoattack-standard", "autoattack", acc)]
    )
    report.update(
      objective=run,
      split="test",
      worst_case=dict(report["worst_case"], accuracy=float(robust.mean())),
    )
    (folder / f"{name}.json").write_text(json.dumps(report))
    np.savez(folder / f"{name}.npz", indices=np.arange(n), worst_case=robust)
  return str(tmp_path / run)


@pytest.mark.slow
def test_launch_compare_finds_the_reports_that_exist(tmp_path):
  d = _eval_dir(
    tmp_path,
    "fsr",
    {
      "report_step9_table_aa_n100": 0.42,
      "report_step9_table_aa_n1000": 0.4,
      "report_step9_table_n100": 0.5,
    },
  )
  b = _eval_dir(tmp_path, "base", {"report_step9_table_aa_n100": 0.40})
  assert sorted(compare.reports_by_n(d, "table_aa"), key=str) == [100, 1000]
  assert compare.common_n([d, b], "table_aa") == 100
  with pytest.raises(
    FileNotFoundError, match=r"no N with a pgd report in every run \(.*fsr: none; .*base: none\)"
  ):
    compare.common_n([d, b], "pgd")
  out = subprocess.run(
    [sys.executable, "-m", "launch.compare", f"--defense={d}", f"--base={b}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.splitlines()
  assert lines[0] == "table_aa reports on 100 test images (--num_examples picks another N)"
  assert lines[1].startswith("fsr vs base (n=100): worst case 42.00 vs 40.00, diff +2.00")
  assert [l for l in lines if l.startswith("warning: ")][-1].startswith("warning: one seed pair")
  # A usage mistake: the message alone on stderr, last, no help text and no traceback.
  out = subprocess.run(
    [sys.executable, "-m", "launch.compare", f"--defense={d},{d}", f"--base={b}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 1 and out.stderr.splitlines() == [
    "FATAL --defense has 2 entries and --base 1: give one base run per defense run (the same seeds, in order)"
  ]
