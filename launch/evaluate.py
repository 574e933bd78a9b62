"""Evaluate a checkpoint on the test set: JSON report, Markdown table, plots.

  python -m launch.evaluate --workdir=DIR [--step=best] [--preset=pgd|full|autoattack]
      [--num_examples=1000] [--surrogate=OTHER_WORKDIR]

Eval-mode BatchNorm, fp32, the checkpoint chosen on the validation split. Presets:
``pgd`` clean + PGD-k (``config.eval``); ``full`` FGSM, PGD-k/100, restarts, C&W-inf,
the objective's adaptive attack, transfer (with --surrogate), AutoAttack, eps and steps
sweeps and the gradient-masking checks; ``autoattack`` clean + AutoAttack; ``ladder``
``table_aa`` + FGSM + PGD-k at every ``eval.ladder`` strength, and the objective's analysis
against eps (AFA stage II: the fusion weight, plot ``fusion_weight_vs_eps.png``). The number to quote is the per-example worst case (the report's headline and the last
line on stdout); a defense's row needs ``--preset=table_aa`` (its adaptive attacks and
AutoAttack). Per-example
results are cached under DIR/eval/cache, so re-running adds attacks without redoing
old ones and an interrupted long run resumes chunk by chunk.
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from launch import common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config",
  None,
  "Config whose eval.* fields set the attacks (default: the workdir's saved config).",
  lock_config=True,
)
flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/ and config.json.")
flags.DEFINE_string(
  "step",
  "best",
  "best (by the validation metric: robust accuracy; clean for standard training) | latest | a step number.",
)
flags.DEFINE_string(
  "preset",
  None,
  "pgd | table | table_aa | full | autoattack | ladder (default: config.eval.preset).",
)
flags.DEFINE_integer(
  "num_examples", None, "Evaluate the first N test images (default: config.eval.num_examples)."
)
flags.DEFINE_string("surrogate", None, "Workdir of a surrogate model for the transfer attack.")
flags.DEFINE_string("output", None, "Report directory (default: WORKDIR/eval).")
flags.DEFINE_integer(
  "chunk", 1000, "Examples per cache entry: an interrupted run resumes chunk by chunk."
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    common.fatal(f"unexpected arguments: {argv[1:]} (flags take the form --name=value)")
  common.init_runtime()
  from agad.evaluation import checkpoint_eval, report as report_lib

  if FLAGS.config:  # --config.eps sets eval.eps unless --config.eval.eps is given too
    common.resolve_radii(FLAGS.config, common.explicit_overrides(), fields=("eval.eps",))
  with common.refuse_bad_input():  # Bad flags are refused before any work, in one line.
    common.check_evaluate_flags(
      workdir=FLAGS.workdir,
      step=FLAGS.step,
      preset=FLAGS.preset,
      num_examples=FLAGS.num_examples,
      surrogate=FLAGS.surrogate,
      output=FLAGS.output,
      chunk=FLAGS.chunk,
      eval_config=FLAGS.config.eval if FLAGS.config else None,
    )

  report, stem = checkpoint_eval.evaluate(
    FLAGS.workdir,
    step=FLAGS.step,
    preset=FLAGS.preset,
    num_examples=FLAGS.num_examples,
    surrogate=FLAGS.surrogate,
    output=FLAGS.output,
    chunk=FLAGS.chunk,
    eval_config=FLAGS.config.eval if FLAGS.config else None,
    log=logging.info,
  )
  for r in report["records"] + [report["worst_case"]]:
    logging.info(
      "%-22s %6.2f%% +- %.2f (n=%d)", r["attack"], 100 * r["accuracy"], 100 * r["stderr"], r["n"]
    )
  for w in report["warnings"]:
    logging.warning("check: %s", w)
  for w in report.get("before_quoting", []):
    logging.warning("before quoting: %s", w)
  logging.info("report written to %s.{json,md}", stem)
  # stdout: every row, then the number to quote (the per-example worst case) on its own line.
  print(
    json.dumps(
      {
        **{r["attack"]: round(100 * r["accuracy"], 2) for r in report["records"]},
        "worst-case": round(100 * report["worst_case"]["accuracy"], 2),
      }
    )
  )
  for w in report.get("before_quoting", []):
    print(f"warning: {w}")
  print(f"number to quote: {report_lib.headline(report)}")


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
