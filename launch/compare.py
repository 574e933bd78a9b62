"""Does a defense beat its base? Paired worst-case comparison on the same test images.

  python -m launch.compare --defense=DIR_SEED0,DIR_SEED1 --base=BASE_SEED0,BASE_SEED1 \
      [--preset=table_aa] [--num_examples=1000] [--output=comparison.json]

Seeds pair up in order (defense seed s against base seed s). Each entry is a workdir
(its one ``eval/report_step*_{preset}_n{N}.json``) or a report's .json path; each report
needs the per-example .npz that ``launch.evaluate`` writes beside it (re-run the same
evaluation on an older report: cached rows take seconds). Without ``--num_examples`` the
largest N that every run has a report for is used. Prints, per seed and pooled, the
worst-case accuracy difference (defense - base) with its paired standard error, the
discordant images and the exact sign-test p-value (``agad/evaluation/compare.py``), then a
``warning:`` line for each reason not to conclude yet (clean accuracy near chance, one seed
pair, fewer images than the difference needs).
"""

import json

from absl import app, flags

from launch import common

FLAGS = flags.FLAGS
flags.DEFINE_list("defense", None, "Workdirs (or report .json paths) of the defense, one per seed.")
flags.DEFINE_list(
  "base", None, "Workdirs (or report .json paths) of the base, the same seeds in the same order."
)
flags.DEFINE_string("preset", "table_aa", "Preset of the reports to compare.")
flags.DEFINE_integer(
  "num_examples",
  None,
  "N of the reports (report_step*_{preset}_n{N}.json); 0: all test "
  "images; default: the largest N every run has a report for.",
)
flags.DEFINE_string("output", None, "Optional JSON file for the per-seed and pooled results.")
flags.mark_flags_as_required(["defense", "base"])


def main(argv):
  if len(argv) > 1:
    common.fatal(f"unexpected arguments: {argv[1:]} (flags take the form --name=value)")
  from agad.evaluation import compare

  if len(FLAGS.defense) != len(FLAGS.base):
    common.fatal(
      f"--defense has {len(FLAGS.defense)} entries and --base {len(FLAGS.base)}: "
      "give one base run per defense run (the same seeds, in order)"
    )
  pairs = []
  with common.refuse_bad_input():  # a missing report or mismatched runs: one line with the fix
    if FLAGS.num_examples is None:
      n = compare.common_n(FLAGS.defense + FLAGS.base, FLAGS.preset)
      print(
        f"{FLAGS.preset} reports on {'all' if n is None else n} test images (--num_examples picks another N)"
      )
    else:
      n = FLAGS.num_examples or None
    for d, b in zip(FLAGS.defense, FLAGS.base):
      pairs.append(
        compare.compare_reports(
          compare.report_path(d, FLAGS.preset, n), compare.report_path(b, FLAGS.preset, n)
        )
      )
  for r in pairs:
    print(
      f"{r['objective_a']} vs {r['objective_b']} (n={r['n']}): worst case {100 * r['acc_a']:.2f} vs "
      f"{100 * r['acc_b']:.2f}, diff {100 * r['diff']:+.2f} +- {100 * r['stderr']:.2f} pp (paired), "
      f"robust only for the defense {r['a_only']}, only for the base {r['b_only']}, "
      f"sign test p = {r['p_value']:.3g}"
    )
  pooled = compare.pooled(pairs)
  print(
    f"pooled over {pooled['seeds']} seed pair(s): diff {100 * pooled['diff']:+.2f} +- "
    f"{100 * pooled['stderr']:.2f} pp (per seed {100 * pooled['min_diff']:+.2f} ... {100 * pooled['max_diff']:+.2f})"
  )
  warnings = compare.warnings(pairs, pooled)
  for w in warnings:
    print(f"warning: {w}")
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump({"pairs": pairs, "pooled": pooled, "warnings": warnings}, f, indent=2)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
