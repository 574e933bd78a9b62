"""Evaluate a checkpoint on the test set: JSON report, Markdown table, plots.

  python -m launch.evaluate --workdir=DIR [--step=best] [--preset=pgd|full|autoattack]
      [--num_examples=1000] [--surrogate=OTHER_WORKDIR]

Eval-mode BatchNorm, fp32, the checkpoint chosen on the validation split. Presets:
``pgd`` clean + PGD-k (``config.eval``); ``full`` FGSM, PGD-k/100, restarts, C&W-inf,
the objective's adaptive attack, transfer (with --surrogate), AutoAttack, eps and steps
sweeps and the gradient-masking checks; ``autoattack`` clean + AutoAttack. Per-example
results are cached under DIR/eval/cache, so re-running adds attacks without redoing
old ones and an interrupted long run resumes chunk by chunk.
"""

import json
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

from launch import common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config whose eval.* fields set the attacks "
                                "(default: the workdir's saved config).", lock_config=True)
flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/ and config.json.")
flags.DEFINE_string("step", "best", "best (by validation robust accuracy) | latest | a step number.")
flags.DEFINE_string("preset", None, "pgd | full | autoattack (default: config.eval.preset).")
flags.DEFINE_integer("num_examples", None, "Evaluate the first N test images (default: config.eval.num_examples).")
flags.DEFINE_string("surrogate", None, "Workdir of a surrogate model for the transfer attack.")
flags.DEFINE_string("output", None, "Report directory (default: WORKDIR/eval).")
flags.DEFINE_integer("chunk", 1000, "Examples per cache entry: an interrupted run resumes chunk by chunk.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.init_runtime()
  from agad import api
  from agad.evaluation import presets, report as report_lib, suite
  from agad.training import records

  from configs import common as config_common

  saved = api.load_config(FLAGS.workdir)
  # Workdirs saved before a field existed still evaluate: defaults under the saved values.
  eval_cfg = config_common.base_config().eval
  eval_cfg.update((FLAGS.config or saved).eval)
  preset = FLAGS.preset or eval_cfg.preset
  loaded = api.load(FLAGS.workdir, FLAGS.step, params=eval_cfg.params, config=saved)
  test = loaded.experiment.splits.test
  n = FLAGS.num_examples or eval_cfg.num_examples
  indices = None if n is None else list(range(min(n, len(test))))
  adaptive_factory = loaded.experiment.objective.adaptive_loss
  adaptive = adaptive_factory(loaded.model, loaded.variables) if adaptive_factory else None
  surrogate = api.load(FLAGS.surrogate, "best").logits_fn if FLAGS.surrogate else None
  specs = presets.build_specs(eval_cfg, preset=preset, adaptive=adaptive is not None,
                              surrogate=surrogate is not None)
  out_dir = FLAGS.output or os.path.join(FLAGS.workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  model_hash = suite.params_hash(loaded.variables)
  logging.info("evaluating %s step %d (%s, hash %s) on %d test images: %s", FLAGS.workdir, loaded.step,
               eval_cfg.params, model_hash, len(test) if indices is None else len(indices),
               ", ".join(s.name for s in specs))
  t0 = time.time()
  report = suite.run_suite(
      loaded.logits_fn, test, specs, eps=float(eval_cfg.eps), indices=indices,
      batch_size=int(eval_cfg.batch_size), seed=int(eval_cfg.seed),
      cache_dir=os.path.join(out_dir, "cache") if eval_cfg.cache else None, model_hash=model_hash,
      adaptive_loss=adaptive, surrogate=surrogate, log=logging.info, chunk=FLAGS.chunk,
      sweep_steps=int(eval_cfg.pgd_steps),
      meta={"workdir": os.path.abspath(FLAGS.workdir), "step": loaded.step, "params": eval_cfg.params,
            "dataset": saved.data.name, "split": "test", "model": saved.model.name,
            "objective": saved.objective.name, "bn": "eval (running statistics)", "dtype": "float32",
            "preset": preset})
  stem = os.path.join(out_dir, f"report_step{loaded.step}_{preset}" + (f"_n{len(indices)}" if indices else ""))
  records.write_json(stem + ".json", report)
  with open(stem + ".md", "w") as f:
    f.write(report_lib.markdown(report))
  report_lib.plots(report, out_dir)
  for r in report["records"] + [report["worst_case"]]:
    logging.info("%-22s %6.2f%% +- %.2f (n=%d)", r["attack"], 100 * r["accuracy"], 100 * r["stderr"], r["n"])
  for w in report["warnings"]:
    logging.warning("check: %s", w)
  print(json.dumps({r["attack"]: round(100 * r["accuracy"], 2) for r in report["records"]}))
  logging.info("report written to %s.{json,md}", stem)


if __name__ == "__main__":
  app.run(main)
