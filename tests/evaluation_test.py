"""Evaluation suite: worst case, cache, re-verification, gradient-masking checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from agad.data import ArraySource
from agad.evaluation import AttackSpec, Suite, build_specs, checks, run_suite
from agad.evaluation.report import markdown, plots

SHAPE = (6, 6, 1)


def _templates_source(n=48, seed=0):
  rng = np.random.default_rng(seed)
  templates = rng.uniform(0.2, 0.8, (3, *SHAPE)).astype(np.float32)
  labels = rng.integers(0, 3, n)
  images = np.clip(templates[labels] + rng.normal(0, 0.03, (n, *SHAPE)), 0, 1)
  return ArraySource((images * 255).round().astype(np.uint8), labels), jnp.asarray(templates)


def _nearest_template(templates, x):
  """Linear nearest-template classifier: logits_k = 2 <x, t_k> - ||t_k||^2."""
  flat = x.reshape(x.shape[0], -1)
  t = templates.reshape(templates.shape[0], -1)
  return 2.0 * flat @ t.T - jnp.sum(t * t, -1)


def _quantised(templates, x):
  """Gradient masking by input quantisation (zero gradient almost everywhere)."""
  return _nearest_template(templates, jax.lax.stop_gradient(jnp.round(x * 4) / 4))


def test_worst_case_cache_and_verification(tmp_path):
  source, templates = _templates_source()
  logits_fn = Partial(_nearest_template, templates)
  specs = [
    AttackSpec.make("clean", "clean", eps=0.3),
    AttackSpec.make("fgsm", "fgsm", eps=0.3),
    AttackSpec.make("pgd-5", "pgd", eps=0.3, step_size=0.1, steps=5, restarts=1),
  ]
  suite = Suite(
    logits_fn, source, batch_size=16, cache_dir=str(tmp_path), model_hash="m1", chunk=16, log=None
  )
  recs = [suite.run(s) for s in specs]
  clean, fgsm, pgd = (r["accuracy"] for r in recs)
  assert clean > 0.9  # the classifier works
  assert pgd < 0.1  # and is not robust at eps 0.3
  assert pgd <= clean and fgsm <= clean
  worst = suite.worst_case()
  assert worst["accuracy"] <= min(clean, fgsm, pgd)
  assert worst["stderr"] == pytest.approx(np.sqrt(worst["accuracy"] * (1 - worst["accuracy"]) / 48))
  v = suite.verify(0.3)
  assert v["checked"] == int(round(48 * (1 - worst["accuracy"])))
  assert v["outside_ball"] == v["outside_box"] == v["nonfinite"] == 0
  # Clean-misclassified points store their clean image (misclassified too): nothing fails.
  assert v["not_misclassified"] == 0

  # A corrupted stored adversarial (outside the ball) is caught.
  pos = next(iter(suite.adversarial))
  suite.adversarial[pos] = np.clip(suite.adversarial[pos] + 0.5, 0, 1)
  assert suite.verify(0.3)["outside_ball"] >= 1

  # Second suite: same hash and settings -> cached; a new setting or model is recomputed.
  again = Suite(
    logits_fn, source, batch_size=16, cache_dir=str(tmp_path), model_hash="m1", chunk=16, log=None
  )
  rec = again.run(specs[2])
  assert rec["cached_chunks"] == 3 and rec["accuracy"] == pgd
  # The record keeps the compute time of the cached chunks, not the time to load them.
  assert rec["wall_time_s"] == pytest.approx(recs[2]["wall_time_s"], rel=1e-6)
  assert rec["this_run_s"] < rec["wall_time_s"] + 5
  other = again.run(AttackSpec.make("pgd-5", "pgd", eps=0.2, step_size=0.1, steps=5, restarts=1))
  assert other["cached_chunks"] == 0
  new_model = Suite(
    logits_fn, source, batch_size=16, cache_dir=str(tmp_path), model_hash="m2", chunk=16, log=None
  )
  assert new_model.run(specs[2])["cached_chunks"] == 0


def test_masked_gradients_fire_the_checks():
  source, templates = _templates_source(seed=1)
  masked = Partial(_quantised, templates)
  report = run_suite(
    masked,
    source,
    [
      AttackSpec.make("clean", "clean", eps=0.1),
      AttackSpec.make("fgsm", "fgsm", eps=0.1),
      AttackSpec.make("pgd-5", "pgd", eps=0.1, step_size=0.03, steps=5, restarts=1),
    ],
    eps=0.1,
    batch_size=16,
    log=None,
  )
  assert any("zero input gradients" in w for w in report["warnings"]), report["warnings"]


def test_report_warnings_on_hand_made_records():
  rec = lambda name, kind, acc, **kw: {
    "attack": name,
    "kind": kind,
    "accuracy": acc,
    "stderr": 0.01,
    "n": 1000,
    "eps": kw.pop("eps", 0.1),
    **kw,
  }
  report = {
    "eps": 0.1,
    "sweep_steps": 20,
    "records": [
      rec("fgsm", "fgsm", 0.50),
      rec("pgd-20", "pgd", 0.60, steps=20, restarts=1, loss="ce"),  # weaker than FGSM
      rec("pgd-100", "pgd", 0.55, steps=100, restarts=1, loss="ce"),  # not converged
      rec("square", "square", 0.40),  # black-box wins
      rec("autoattack", "autoattack", 0.45),  # big PGD-AA gap
      rec("pgd-20@0.2", "pgd", 0.65, eps=0.2, steps=20, restarts=1, loss="ce"),  # rises with eps
      rec("pgd-20@0.5", "pgd", 0.30, eps=0.5, steps=20, restarts=1, loss="ce"),  # not ~0 at 0.5
    ],
  }
  w = " | ".join(checks.report_warnings(report))
  for needle in (
    "weaker than FGSM",
    "beats every white-box",
    "has not converged",
    "above AutoAttack",
    "rises with eps",
    "should be ~0",
  ):
    assert needle in w, needle
  clean_report = {
    "eps": 0.1,
    "sweep_steps": 20,
    "records": [
      rec("fgsm", "fgsm", 0.60),
      rec("pgd-20", "pgd", 0.50, steps=20, restarts=1, loss="ce"),
      rec("pgd-100", "pgd", 0.496, steps=100, restarts=1, loss="ce"),
      rec("pgd-20@0.5", "pgd", 0.0, eps=0.5, steps=20, restarts=1, loss="ce"),
    ],
  }
  assert checks.report_warnings(clean_report) == []


def test_checks_at_their_threshold_do_not_fire_on_float_noise():
  # 0.641 - 0.601 is 4.0000000000000036 pp in floats: exactly the 4 pp threshold, which says "more than".
  rec = lambda name, kind, acc, **kw: {
    "attack": name,
    "kind": kind,
    "accuracy": acc,
    "stderr": 0.01,
    "n": 1000,
    "eps": 0.1,
    **kw,
  }
  pgd = lambda name, acc, steps: rec(name, "pgd", acc, steps=steps, restarts=1, loss="ce")
  at = {
    "eps": 0.1,
    "sweep_steps": 20,
    "records": [
      pgd("pgd-20", 0.641, 20),
      pgd("pgd-100", 0.631, 100),
      rec("autoattack", "autoattack", 0.601),
      rec("fgsm", "fgsm", 0.636),
      rec("square", "square", 0.599),
    ],
  }  # every gap exactly at its threshold
  assert checks.report_warnings(at) == []
  above = {
    "eps": 0.1,
    "sweep_steps": 20,
    "records": [
      pgd("pgd-20", 0.642, 20),
      pgd("pgd-100", 0.630, 100),
      rec("autoattack", "autoattack", 0.601),
      rec("fgsm", "fgsm", 0.636),
      rec("square", "square", 0.597),
    ],
  }
  w = " | ".join(checks.report_warnings(above))
  for needle in (
    "4.10 pp above AutoAttack",
    "falls by 1.20 pp",
    "weaker than FGSM",
    "beats every white-box attack (best 60.10%)",
  ):
    assert needle in w, (needle, w)


def test_randomised_model_is_flagged():
  source, templates = _templates_source(seed=2)
  rng = np.random.default_rng(0)
  noisy = lambda x: _nearest_template(templates, x) + rng.normal(size=(x.shape[0], 3))
  assert any("randomised" in m for m in checks.model_checks(noisy, source, np.arange(8)))
  stochastic = lambda x, key: (
    _nearest_template(templates, x) + jax.random.normal(key, (x.shape[0], 3))
  )
  assert any(
    "randomised" in m
    for m in checks.model_checks(stochastic, source, np.arange(8), stochastic=True)
  )
  deterministic = Partial(_nearest_template, templates)
  assert checks.model_checks(deterministic, source, np.arange(8)) == []


def test_presets_markdown_and_plots(tmp_path):
  from configs import fashion_mnist

  cfg = fashion_mnist.get_config("").eval
  names = [s.name for s in build_specs(cfg, preset="full", adaptive=True)]
  for needle in (
    "clean",
    "fgsm",
    "pgd-20",
    "pgd-100",
    "pgd-20x5",
    "cw-30",
    "adaptive-pgd-20",
    "autoattack-standard",
    "pgd-20@eps=0.5",
  ):
    assert needle in names, needle
  table_aa = [s.name for s in build_specs(cfg, preset="table_aa", adaptive=True)]
  assert table_aa == ["clean", "pgd-20", "cw-30", "adaptive-pgd-20", "autoattack-standard"]
  # Same specs (hence the same cache entries) as the table preset's.
  assert build_specs(cfg, preset="table_aa")[:3] == build_specs(cfg, preset="table")
  assert "adaptive-pgd-20" not in [s.name for s in build_specs(cfg, preset="table_aa")]
  variants = build_specs(cfg, preset="table_aa", adaptive=("", "st"))
  assert [s.name for s in variants][3:5] == ["adaptive-pgd-20", "adaptive-st-pgd-20"]
  assert variants[3] == build_specs(cfg, preset="table_aa", adaptive=True)[3]  # same cache key
  rec = lambda acc, **kw: {
    "attack": "a",
    "kind": "pgd",
    "accuracy": acc,
    "stderr": 0.01,
    "n": 10,
    "restarts": 1,
    "loss": "ce",
    **kw,
  }
  report = {
    "n": 10,
    "eps": 0.1,
    "norm": "linf",
    "sweep_steps": 20,
    "warnings": ["w1"],
    "records": [
      rec(0.5, eps=0.1, steps=20),
      rec(0.2, eps=0.2, steps=20),
      rec(0.6, eps=0.1, steps=5),
    ],
    "worst_case": {"attack": "worst-case", "accuracy": 0.2, "stderr": 0.1, "n": 10},
  }
  text = markdown(report)
  assert "| a |" in text and "w1" in text and "50.00" in text
  assert "matmul precision" not in text  # reports written before the field keep their header
  here, there = "gpu: NVIDIA H100, default matmul precision", "cpu: cpu, default matmul precision"
  report["records"][0]["computed_on"] = [there]
  report["records"][1]["computed_on"] = [here]
  text = markdown({**report, "computed_here": here})
  assert text.splitlines()[0].endswith(f"fp32 ({here})")
  assert f"- a: {there}" in text and text.count("- a: ") == 1  # only the row computed elsewhere
  assert len(plots(report, str(tmp_path))) == 2


@pytest.mark.slow
def test_autoattack_stages_are_cached_and_aggregated_over_chunks(tmp_path):
  source, templates = _templates_source(n=32, seed=2)
  logits_fn = Partial(_nearest_template, templates)
  spec = AttackSpec.make("aa", "autoattack", eps=0.14, version="standard")  # ~half robust
  kw = dict(batch_size=16, cache_dir=str(tmp_path), model_hash="m", chunk=16, log=None)
  first = Suite(logits_fn, source, **kw).run(spec)
  stages = first["per_attack"]
  # Three classes: APGD-T is skipped (the targeted DLR loss needs four), as in the reference.
  assert list(stages) == ["apgd-ce", "fab-t", "square"]
  values = list(stages.values())
  assert all(a >= b for a, b in zip(values, values[1:]))  # monotone over stages
  assert values[-1] == pytest.approx(first["accuracy"])
  assert 0.0 < first["accuracy"] < 1.0, "eps must leave some points robust for this test"
  assert set(first["per_attack_time_s"]) == set(stages)
  again = Suite(logits_fn, source, **kw).run(spec)
  assert again["cached_chunks"] == 2
  assert again["per_attack"] == stages and again["accuracy"] == first["accuracy"]
  assert "| &nbsp;&nbsp;after square |" in markdown(
    {"n": 32, "eps": 0.14, "norm": "linf", "records": [again], "worst_case": again}
  )


def test_steps_curve_and_eps_sweep_do_not_fire_checks_or_enter_the_worst_case(tmp_path):
  rec = lambda name, acc, steps, eps=0.1, step=0.01: {
    "attack": name,
    "kind": "pgd",
    "accuracy": acc,
    "stderr": 0.01,
    "n": 1000,
    "eps": eps,
    "steps": steps,
    "step_size": step,
    "restarts": 1,
    "loss": "ce",
  }
  report = {
    "eps": 0.1,
    "sweep_steps": 20,
    "records": [
      {"attack": "fgsm", "kind": "fgsm", "accuracy": 0.74, "stderr": 0.01, "n": 1000, "eps": 0.1},
      rec("pgd-20", 0.72, 20),
      rec("pgd-100", 0.715, 100),
      rec("pgd-1", 0.80, 1),
      rec("pgd-5", 0.77, 5),  # cannot reach the boundary
      rec("pgd-10", 0.75, 10),  # reaches it, but is the steps curve
      {
        "attack": "aa",
        "kind": "autoattack",
        "accuracy": 0.70,
        "stderr": 0.01,
        "n": 1000,
        "eps": 0.1,
      },
      rec("pgd-20@eps=0.5", 0.0, 20, eps=0.5, step=0.05),
    ],
  }
  assert checks.report_warnings(report) == []
  # The suite's verdict at eps 0.1 ignores a run at eps 0.5 (which breaks everything).
  source, templates = _templates_source()
  suite = Suite(Partial(_nearest_template, templates), source, batch_size=16, log=None, eps=0.05)
  small = suite.run(AttackSpec.make("pgd-5", "pgd", eps=0.05, step_size=0.02, steps=5))
  big = suite.run(AttackSpec.make("pgd-5@0.5", "pgd", eps=0.5, step_size=0.2, steps=5))
  assert big["accuracy"] < small["accuracy"]
  worst = suite.worst_case()
  assert worst["accuracy"] == small["accuracy"] and worst["over"] == ["pgd-5"]
  v = suite.verify(0.05)
  assert v["outside_ball"] == 0 and v["checked"] == int(round(48 * (1 - small["accuracy"])))


def test_adaptive_loss_variants_are_picked_by_name():
  source, templates = _templates_source(n=16, seed=3)
  logits_fn = Partial(_nearest_template, templates)

  def ce(x, y):
    logp = jax.nn.log_softmax(_nearest_template(templates, x))
    return -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]

  variants = {"": ce, "descend": lambda x, y: -ce(x, y)}
  suite = Suite(logits_fn, source, batch_size=16, log=None, adaptive_loss=variants)
  specs = {v: s for v, s in zip(("", "descend"), build_specs_adaptive(("", "descend")))}
  ascend = suite.run(specs[""])["accuracy"]
  descend = suite.run(specs["descend"])["accuracy"]
  clean = suite.run(AttackSpec.make("clean", "clean", eps=0.3))["accuracy"]
  assert ascend < clean == descend  # descending the CE never breaks a correct point
  with pytest.raises(ValueError, match="variant 'nope'.*'descend'"):
    suite.run(AttackSpec.make("x", "adaptive", eps=0.3, step_size=0.1, steps=2, variant="nope"))
  single = Suite(logits_fn, source, batch_size=16, log=None, adaptive_loss=ce)
  with pytest.raises(ValueError, match="single adaptive loss"):
    single.run(specs["descend"])


def build_specs_adaptive(variants):
  from agad.evaluation.presets import adaptive_specs

  return adaptive_specs(variants, eps=0.3, step=0.1, k=5)


# ------------------------------------------------------------------ no over-reporting


def _specs(eps=0.3):
  return [
    AttackSpec.make("clean", "clean", eps=eps),
    AttackSpec.make("pgd-5", "pgd", eps=eps, step_size=eps / 3, steps=5, restarts=1),
  ]


def test_every_preset_runs_the_adaptive_variants():
  from configs import fashion_mnist
  from agad.evaluation import PRESETS

  cfg = fashion_mnist.get_config("").eval
  for preset in PRESETS:
    names = [s.name for s in build_specs(cfg, preset=preset, adaptive=("", "st"))]
    assert "adaptive-pgd-20" in names and "adaptive-st-pgd-20" in names, (preset, names)
    assert not any(
      n.startswith("adaptive") for n in (s.name for s in build_specs(cfg, preset=preset))
    ), preset
  table = build_specs(cfg, preset="table", adaptive=True)
  assert build_specs(cfg, preset="table_aa", adaptive=True)[: len(table)] == table  # cache reuse


def test_checks_that_cannot_run_are_listed_not_claimed_silent():
  source, templates = _templates_source(n=16)
  report = run_suite(
    Partial(_nearest_template, templates),
    source,
    _specs(0.05),
    eps=0.05,
    batch_size=16,
    log=None,
    sweep_steps=5,
  )
  assert report["warnings"] == []
  skipped = " | ".join(report["not_applicable"])
  for needle in (
    "FGSM row",
    "Square or transfer",
    "AutoAttack row",
    "several eps",
    "eps >= 0.5",
    "more steps or restarts",
  ):
    assert needle in skipped, needle
  text = markdown(report)
  assert "No gradient-masking check fired." not in text
  assert "No applicable gradient-masking check fired" in text and "needs an FGSM row" in text
  rec = lambda name, kind, acc, **kw: {
    "attack": name,
    "kind": kind,
    "accuracy": acc,
    "stderr": 0.01,
    "n": 1000,
    "eps": kw.pop("eps", 0.1),
    **kw,
  }
  full = {
    "eps": 0.1,
    "sweep_steps": 20,
    "records": [
      rec("fgsm", "fgsm", 0.6),
      rec("square", "square", 0.55),
      rec("aa", "autoattack", 0.45),
      rec("pgd-20", "pgd", 0.5, steps=20, restarts=1, loss="ce"),
      rec("pgd-100", "pgd", 0.5, steps=100, restarts=1, loss="ce"),
      rec("pgd-20@0.5", "pgd", 0.0, eps=0.5, steps=20, restarts=1, loss="ce"),
    ],
  }
  assert checks.not_applicable(full) == []


def test_autoattack_flags_reach_the_record_json_and_markdown(tmp_path):
  import json

  source, templates = _templates_source(n=16, seed=4)
  masked = Partial(_quantised, templates)  # input gradient exactly zero everywhere
  spec = AttackSpec.make(
    "aa", "autoattack", eps=0.1, version="custom", attacks=("apgd-ce",), steps=4
  )
  kw = dict(eps=0.1, batch_size=16, log=None, cache_dir=str(tmp_path), model_hash="q")
  report = run_suite(masked, source, [spec], **kw)
  record = report["records"][0]
  assert any("zero input gradient" in f for f in record["flags"]), record
  assert any(w.startswith("aa: ") and "zero input gradient" in w for w in report["warnings"])
  assert "zero input gradient" in json.dumps(report, default=str)
  assert "zero input gradient" in markdown(report)
  again = run_suite(masked, source, [spec], **kw)["records"][0]  # flags survive the cache
  assert again["cached_chunks"] == 1 and again["flags"] == record["flags"]


def test_cache_key_covers_weights_fingerprint_dtype_and_attack_code(tmp_path, monkeypatch):
  from agad.evaluation import params_hash, suite as suite_lib

  w = {"params": {"a": np.zeros((3, 2), np.float32), "b": np.ones(2, np.float32)}}
  changed = {"params": {"a": w["params"]["a"].copy(), "b": w["params"]["b"]}}
  changed["params"]["a"][1, 0] = 1e-6  # one weight
  assert params_hash(w) != params_hash(changed)
  assert params_hash(w) == params_hash(
    {"params": {"a": np.zeros((3, 2), np.float32), "b": np.ones(2, np.float32)}}
  )
  assert params_hash(w) != params_hash(
    {"params": {"a": np.zeros((2, 3), np.float32), "b": np.ones(2, np.float32)}}
  )

  source, templates = _templates_source(n=16)
  logits_fn = Partial(_nearest_template, templates)
  spec = _specs()[1]
  run = lambda **kw: Suite(
    logits_fn,
    source,
    batch_size=16,
    cache_dir=str(tmp_path),
    log=None,
    **{"model_hash": "m", "fingerprint": "smallcnn/bn", **kw},
  ).run(spec)["cached_chunks"]
  assert run() == 0 and run() == 1
  assert run(fingerprint="smallcnn/gn") == 0  # another model definition
  assert run(dtype="bfloat16") == 0  # another compute dtype
  assert run(model_hash="m2") == 0  # other weights
  monkeypatch.setattr(suite_lib, "ATTACK_CODE_VERSION", suite_lib.ATTACK_CODE_VERSION + 1)
  monkeypatch.setattr(
    suite_lib.cache_key,
    "__kwdefaults__",
    {**suite_lib.cache_key.__kwdefaults__, "version": suite_lib.ATTACK_CODE_VERSION},
  )
  assert run() == 0  # newer attack code
  assert run() == 1


def test_unverified_adversarials_are_caught_and_not_counted(tmp_path):
  source, templates = _templates_source(n=16)
  logits_fn = Partial(_nearest_template, templates)
  kw = dict(batch_size=16, cache_dir=str(tmp_path), model_hash="m", log=None, eps=0.18)
  spec = AttackSpec.make("pgd-5", "pgd", eps=0.18, step_size=0.072, steps=5)  # 4/16 robust
  first = Suite(logits_fn, source, **kw)
  honest = first.run(spec)
  assert honest["unverified"] == 0 and 0 < honest["accuracy"] < 1
  robust = first.results["pgd-5"]["robust"]
  fake = int(np.nonzero(robust)[0][0])  # a robust point: its clean image is classified correctly
  # Tamper with the cache entry: claim the robust point broken, its "adversarial" the clean image.
  (path,) = tmp_path.glob("*.npz")
  with np.load(path) as f:
    entry = dict(f)
  entry["robust"][fake] = False
  np.savez(path, **entry)
  second = Suite(logits_fn, source, **kw)
  record = second.run(spec)
  assert record["cached_chunks"] == 1
  assert record["unverified"] == 1 and record["verification_failures"] == {"not_misclassified": 1}
  assert record["accuracy"] == honest["accuracy"]  # the fake break does not count
  assert record["claimed_accuracy"] == pytest.approx(honest["accuracy"] - 1 / 16)
  assert fake not in second.adversarial and second.worst_case()["accuracy"] == honest["accuracy"]
  assert second.verify(0.18)["not_misclassified"] == 0
  # verify() itself catches a stored "adversarial" that is not misclassified.
  second.adversarial[fake] = entry["adversarial"][fake]
  assert second.verify(0.18)["not_misclassified"] == 1


def test_dtype_is_reported_and_verification_uses_verify_logits_fn():
  source, templates = _templates_source(n=16)
  logits_fn = Partial(_nearest_template, templates)
  labels = np.asarray(source.labels)
  base = run_suite(logits_fn, source, _specs(), eps=0.3, batch_size=16, log=None)
  assert base["dtype"] == "float32" and "float32" in base["verification"]["with"]
  assert markdown(base).splitlines()[0].startswith("Robustness") and ", fp32 (" in markdown(base)
  suite = Suite(logits_fn, source, batch_size=16, log=None)
  suite.run(_specs()[1])
  broken = ~suite.results["pgd-5"]["robust"]
  assert broken.mean() > 0.8 and (broken & (labels == 0)).any()
  # A verifier that always says class 0: only breaks of points labelled 1 or 2 verify.
  class_zero = Partial(lambda x: jnp.zeros((x.shape[0], 3)).at[:, 0].set(1.0))
  report = run_suite(
    logits_fn,
    source,
    _specs(),
    eps=0.3,
    batch_size=16,
    log=None,
    dtype="bfloat16",
    verify_logits_fn=class_zero,
  )
  assert report["dtype"] == "bfloat16" and "float32" in report["verification"]["with"]
  assert ", eval-mode BN, bf16 (" in markdown(report).splitlines()[0]
  pgd = report["records"][1]
  assert pgd["accuracy"] == pytest.approx(1.0 - np.mean(broken & (labels != 0)))
  assert pgd["unverified"] == int(np.sum(broken & (labels == 0)))
  assert report["worst_case"]["accuracy"] == pytest.approx(pgd["accuracy"])
  own = run_suite(logits_fn, source, _specs(), eps=0.3, batch_size=16, log=None, dtype="bfloat16")
  assert any("re-verified in bfloat16" in w for w in own["warnings"])


@pytest.mark.slow
def test_rand_runs_only_on_stochastic_models():
  source, templates = _templates_source(n=16, seed=5)
  spec = AttackSpec.make(
    "aa-rand", "autoattack", eps=0.1, version="rand", steps=3, square_queries=50
  )
  det = Suite(Partial(_nearest_template, templates), source, batch_size=16, log=None).run(spec)
  assert det["version_run"] == "standard" and any("deterministic model" in f for f in det["flags"])
  assert list(det["per_attack"]) == ["apgd-ce", "fab-t", "square"]
  noisy = Partial(
    lambda t, x, key: _nearest_template(t, x + 0.01 * jax.random.normal(key, x.shape)), templates
  )
  sto = Suite(noisy, source, batch_size=16, log=None, stochastic=True).run(spec)
  assert sto["version_run"] == "rand" and list(sto["per_attack"]) == ["apgd-ce", "apgd-dlr"]
  assert not any("deterministic model" in f for f in sto["flags"])


@pytest.mark.slow
def test_eps_zero_gives_clean_accuracy_for_every_attack():
  source, templates = _templates_source(n=16, seed=6)
  logits_fn = Partial(_nearest_template, templates)
  e = 0.0
  specs = [
    AttackSpec.make("clean", "clean", eps=e),
    AttackSpec.make("fgsm", "fgsm", eps=e),
    AttackSpec.make("pgd", "pgd", eps=e, step_size=0.01, steps=3),
    AttackSpec.make("mim", "mim", eps=e, steps=3),
    AttackSpec.make("cw", "cw", eps=e, step_size=0.01, steps=3, kappa=50.0),
    AttackSpec.make("square", "square", eps=e, queries=20),
    AttackSpec.make("apgd-ce", "apgd-ce", eps=e, steps=3),
    AttackSpec.make("aa", "autoattack", eps=e, version="standard", steps=3, square_queries=20),
  ]
  suite = Suite(logits_fn, source, batch_size=16, log=None)
  accs = {s.name: suite.run(s)["accuracy"] for s in specs}
  assert accs["clean"] > 0.5  # the classifier works; no attack may move a point at eps 0
  assert all(a == accs["clean"] for a in accs.values()), accs


def test_probability_outputs_get_a_warning():
  source, templates = _templates_source(n=8)
  softmax = Partial(lambda t, x: jax.nn.softmax(_nearest_template(t, x)), templates)
  assert any("probabilities" in w for w in checks.model_checks(softmax, source, np.arange(8)))
  assert not any(
    "probabilities" in w
    for w in checks.model_checks(Partial(_nearest_template, templates), source, np.arange(8))
  )


def test_runner_verifies_a_bfloat16_model_with_a_float32_forward_pass():
  import types
  from agad import api
  from agad.evaluation import checkpoint_eval
  from agad.models.registry import build_model

  model = build_model("smallcnn", num_classes=10, mean=(0.5,), std=(0.25,), dtype=jnp.bfloat16)
  x = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1))
  variables = model.init(jax.random.key(1), x, train=False)
  leaves, tree = jax.tree.flatten(variables["params"])  # the zero-initialised classifier too
  keys = jax.random.split(jax.random.key(2), len(leaves))
  variables = {
    **variables,
    "params": jax.tree.unflatten(
      tree, [l + 0.1 * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)]
    ),
  }
  loaded = types.SimpleNamespace(model=model, variables=variables)
  assert checkpoint_eval._float32_logits_fn(loaded, "float32") is None
  fp32 = checkpoint_eval._float32_logits_fn(loaded, "bfloat16")
  ref = api.make_logits_fn(
    build_model("smallcnn", num_classes=10, mean=(0.5,), std=(0.25,)), variables
  )
  np.testing.assert_allclose(fp32(x), ref(x), rtol=1e-6, atol=1e-6)
  assert not np.allclose(api.make_logits_fn(model, variables)(x), ref(x), atol=1e-6)  # bf16 differs


def test_pgd_rows_do_not_depend_on_batch_chunk_or_device_count():
  """Same seed, same result whatever the batch size (per-example keys from the example's index)."""
  source, templates = _templates_source(n=40)
  logits_fn = Partial(_nearest_template, templates)
  spec = AttackSpec.make("pgd-5", "pgd", eps=0.18, step_size=0.072, steps=5, restarts=2)
  results = []
  for batch_size, chunk in ((16, 40), (8, 16), (12, 24)):
    suite = Suite(logits_fn, source, batch_size=batch_size, chunk=chunk, log=None, eps=0.18)
    record = suite.run(spec)
    adv = np.stack([suite.adversarial[i] for i in sorted(suite.adversarial)])
    results.append((record["accuracy"], suite.results[spec.name]["robust"], adv))
  (acc0, r0, a0), *rest = results
  assert 0.0 < acc0 < 1.0  # some points break, some do not: the comparison is not vacuous
  for acc, r, a in rest:
    assert acc == acc0
    np.testing.assert_array_equal(r, r0)
    np.testing.assert_array_equal(a, a0)


def test_ladder_preset_and_validation():
  from configs import fashion_mnist
  from agad.evaluation.defaults import merged_eval_config

  cfg = fashion_mnist.get_config("").eval
  specs = build_specs(cfg, preset="ladder", adaptive=True)
  names = [s.name for s in specs]
  # table_aa's rows (same cache keys) plus FGSM and PGD-20 at every rung below eps.
  for s in build_specs(cfg, preset="table_aa", adaptive=True):
    assert s in specs, s.name
  rungs = {s.name: s for s in specs if s.name.startswith("pgd-20@")}
  assert sorted(rungs) == ["pgd-20@eps=0.0125", "pgd-20@eps=0.025", "pgd-20@eps=0.05"]
  for s in rungs.values():  # step / eps held at the eval config's ratio
    assert s.kw["step_size"] == pytest.approx(cfg.step_size * s.kw["eps"] / cfg.eps)
  assert "fgsm" in names and not any(n.startswith("transfer") for n in names)
  with_surrogate = [
    s.name for s in build_specs(cfg, preset="ladder", adaptive=True, surrogate=True)
  ]
  assert with_surrogate == names[:-1] + ["transfer-pgd-20", names[-1]]  # AutoAttack stays last
  for bad in ((0.5, 0.25, 1.0), (0.5,), (0.0, 1.0), (0.5, 1.5)):
    with pytest.raises(ValueError, match=r"eval.ladder=.*increasing factors"):
      merged_eval_config(None, {"ladder": bad})


def test_run_analysis_summarises_plots_and_reports(tmp_path):
  from agad.evaluation.checkpoint_eval import run_analysis

  source, _ = _templates_source(n=10, seed=3)
  seen = []

  def fn(images, labels, key, eps_values):  # y = eps + the image mean: rises with eps
    seen.append(len(labels))
    m = images.reshape(len(labels), -1).mean(1)
    return {
      "name": "toy",
      "xlabel": "eps",
      "ylabel": "y",
      "x": np.asarray(eps_values),
      "y": np.asarray(eps_values)[:, None] + m[None, :] * 1e-3,
      "summary": {},
    }

  out = run_analysis(fn, source, list(range(7)), eps_values=(0.0, 0.1, 0.2), batch_size=3, seed=0)
  assert seen == [3, 3, 1] and out["n"] == 7
  images = source.images[:7].astype(np.float32) / 255
  means = images.reshape(7, -1).mean(1) * 1e-3
  np.testing.assert_allclose(out["y_mean"], np.array([0.0, 0.1, 0.2]) + means.mean(), rtol=1e-6)
  np.testing.assert_allclose(out["y_stderr"], [means.std(ddof=1) / np.sqrt(7)] * 3, rtol=1e-5)
  assert out["summary"]["spearman_x_y"] > 0.8
  report = {
    "n": 7,
    "eps": 0.2,
    "norm": "linf",
    "warnings": [],
    "records": [],
    "worst_case": {"attack": "worst-case", "accuracy": 0.0, "stderr": 0.0, "n": 7},
    "analysis": out,
  }
  text = markdown(report)
  assert "**toy** (y) against eps, n = 7" in text and "| 0.1 |" in text
  assert [p.endswith("toy_vs_eps.png") for p in plots(report, str(tmp_path))] == [True]


def test_input_gradient_stats_tells_a_dead_layer_from_saturation():
  """A hidden ReLU unit that is off for some inputs gives them one identical logit vector
  (constant); a saturated softmax gives zero gradients with distinct logits."""
  from agad.evaluation import checks

  x = jnp.linspace(0.0, 1.0, 10).reshape(10, 1, 1, 1) * jnp.ones((10, 2, 2, 1))
  y = jnp.zeros((10,), jnp.int32)
  # Hidden unit relu(sum(x) - 2): off for the 5 images with sum(x) < 2 (values < 0.5).
  dead = Partial(
    lambda v: (
      jnp.stack([jax.nn.relu(v.sum((1, 2, 3)) - 2.0), jnp.zeros(len(v))], -1)
      + jnp.array([1.0, -1.0])
    )
  )
  stats = checks.input_gradient_stats(dead, x, y)
  off = float(np.mean(np.asarray(x[:, 0, 0, 0]) * 4 <= 2))
  assert off == 0.5
  assert stats["zero"] == pytest.approx(off) and stats["constant"] == pytest.approx(off)
  # Saturation: class 0 wins by >= 200 nats, so p_y = 1 in float32 and the CE gradient is 0,
  # but every image has its own logits.
  saturated = Partial(
    lambda v: jnp.stack([200.0 + 100.0 * v.sum((1, 2, 3)), jnp.zeros(len(v))], -1)
  )
  stats = checks.input_gradient_stats(saturated, x, y)
  assert stats["zero"] == 1.0 and stats["constant"] == 0.0 and stats["nonfinite"] == 0.0
