"""Evaluate a checkpoint on the test set and write a JSON report.

``python -m launch.evaluate --config=configs/fashion_mnist.py --workdir=DIR [--step=best]``

Clean and PGD-k (``config.eval``) accuracy with standard errors on the test split,
eval-mode BatchNorm, fp32. The report goes to ``DIR/eval/report_step<N>.json``.
"""

import json
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

from launch import common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (its eval.* fields set the attacks); "
                                "defaults to the workdir's saved config.", lock_config=True)
flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/ and config.json.")
flags.DEFINE_string("step", "best", "best (by validation robust accuracy) | latest | a step number.")
flags.DEFINE_string("output", None, "Report path (default: WORKDIR/eval/report_step<N>.json).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.init_runtime()
  from agad import api
  from agad import evaluation
  from agad.training import records

  saved = api.load_config(FLAGS.workdir)
  eval_cfg = (FLAGS.config or saved).eval
  loaded = api.load(FLAGS.workdir, FLAGS.step, params=eval_cfg.params, config=saved)
  test = loaded.experiment.splits.test
  indices = None if eval_cfg.num_examples is None else list(range(min(eval_cfg.num_examples, len(test))))
  logging.info("evaluating %s step %d on %d test images: clean + PGD-%d (eps %.4g, step %.4g, %d restart(s))",
               FLAGS.workdir, loaded.step, len(test) if indices is None else len(indices),
               eval_cfg.pgd_steps, eval_cfg.eps, eval_cfg.step_size, eval_cfg.restarts)
  t0 = time.time()
  result = evaluation.evaluate_pgd(loaded.logits_fn, test, eps=eval_cfg.eps, step_size=eval_cfg.step_size,
                                   steps=eval_cfg.pgd_steps, restarts=eval_cfg.restarts,
                                   batch_size=eval_cfg.batch_size, indices=indices, seed=eval_cfg.seed,
                                   log=logging.info)
  report = {
      "workdir": os.path.abspath(FLAGS.workdir), "step": loaded.step, "params": eval_cfg.params,
      "dataset": saved.data.name, "split": "test", "model": saved.model.name,
      "objective": saved.objective.name, "bn": "eval (running statistics)", "dtype": "float32",
      "records": [result["clean_record"], result["pgd_record"]],
      "worst_case": evaluation.accuracy_record(result["robust"], attack="worst-case"),
      "wall_time_s": time.time() - t0,
  }
  out = FLAGS.output or os.path.join(FLAGS.workdir, "eval", f"report_step{loaded.step}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  records.write_json(out, report)
  for r in report["records"]:
    logging.info("%-10s %.2f%% +- %.2f (n=%d, %.0f s)", r["attack"], 100 * r["accuracy"],
                 100 * r["stderr"], r["n"], r["wall_time_s"])
  print(json.dumps({r["attack"]: round(100 * r["accuracy"], 2) for r in report["records"]}))
  logging.info("report written to %s", out)


if __name__ == "__main__":
  app.run(main)
