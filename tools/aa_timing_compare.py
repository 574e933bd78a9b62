"""Dev-only: agad's AutoAttack attacks at two revisions against the reference, in one run.

  bash launch/env_parity.sh
  .venv-parity/bin/python tools/aa_timing_compare.py --before=<git rev> [--rounds=1]
      [--threads=1] [--n=200] [--square_queries=5000] [--attacks=apgd-ce,...]
      [--params_cache=/tmp/tiny.npz] [--output=JSON]

Unpacks ``--before`` (``git archive``) into a temporary folder, then runs
``tools/parity_autoattack.py --timing`` ``--rounds`` times for each revision, alternating
(before, after, before, ...), each process timing the reference and agad side by side
(ABBA) on the same tiny model, images and thread count. Prints per attack: agad before
(cold = first call with compilation, warm = later calls), agad after, and the reference
(median over every process), with robust accuracies and per-example agreement.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_string("before", None, "Git revision of the 'before' agad.", required=True)
flags.DEFINE_integer("rounds", 1, "Processes per revision (alternating before/after).")
flags.DEFINE_integer("threads", 1, "Threads of both frameworks (parity_autoattack --threads).")
flags.DEFINE_integer("n", 200, "First N Fashion-MNIST test images.")
flags.DEFINE_integer("square_queries", 5000, "Square queries.")
flags.DEFINE_integer("repeats", 2, "Calls per attack and implementation in each process.")
flags.DEFINE_list("attacks", ["apgd-ce", "apgd-t", "fab-t", "square"], "Attacks, each alone.")
flags.DEFINE_string("params_cache", "/tmp/agad_parity_tiny.npz", "Trained tiny-net weights.")
flags.DEFINE_string("output", None, "Optional JSON of the combined figures.")


def main(argv):
  del argv
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  work = tempfile.mkdtemp(prefix="agad_timing_")
  before_tree = os.path.join(work, "before")
  os.makedirs(before_tree)
  archive = subprocess.run(
    ["git", "-C", root, "archive", FLAGS.before], check=True, capture_output=True
  ).stdout
  subprocess.run(["tar", "-x", "-C", before_tree], input=archive, check=True)
  trees = {"before": before_tree, "after": root}
  runs: dict[str, list[dict]] = {"before": [], "after": []}
  for round_index in range(FLAGS.rounds):
    for label, tree in trees.items():
      out = os.path.join(work, f"{label}_{round_index}.json")
      cmd = [
        sys.executable,
        os.path.join(root, "tools", "parity_autoattack.py"),
        "--timing",
        f"--agad_root={tree}",
        f"--threads={FLAGS.threads}",
        f"--n={FLAGS.n}",
        f"--square_queries={FLAGS.square_queries}",
        f"--repeats={FLAGS.repeats}",
        f"--attacks={','.join(FLAGS.attacks)}",
        f"--params_cache={FLAGS.params_cache}",
        f"--output={out}",
      ]
      print(f"[{label} round {round_index}] {' '.join(cmd)}", flush=True)
      subprocess.run(cmd, cwd=root, check=True)
      with open(out) as f:
        runs[label].append(json.load(f)["timing"])

  print(
    f"\n=== agad before ({FLAGS.before}) / after (working tree) / reference: N={FLAGS.n}, "
    f"square_queries={FLAGS.square_queries}, threads {FLAGS.threads}, "
    f"{FLAGS.rounds} process(es) per revision, {FLAGS.repeats} calls per attack ==="
  )
  header = (
    f"{'attack':<8} {'before cold':>11} {'before warm':>11} {'after cold':>10} "
    f"{'after warm':>10} {'reference':>9} {'RA bef/aft/ref (%)':>22} {'agree aft':>9}"
  )
  print(header)
  print("-" * len(header))
  combined = {}
  for name in FLAGS.attacks:
    rows = {label: [r["attacks"][name] for r in runs[label]] for label in runs}
    ref = float(np.median([t for label in rows for r in rows[label] for t in r["ref_times"]]))
    med = lambda label, key: float(np.median([r[key] for r in rows[label]]))
    ra = lambda label, key: 100 * rows[label][0][key]
    combined[name] = dict(
      before_cold=med("before", "agad_cold_s"),
      before_warm=med("before", "agad_warm_s"),
      after_cold=med("after", "agad_cold_s"),
      after_warm=med("after", "agad_warm_s"),
      reference=ref,
      ra_before=ra("before", "agad"),
      ra_after=ra("after", "agad"),
      ra_ref=ra("after", "ref"),
      agree_after=rows["after"][0]["agree"],
    )
    c = combined[name]
    print(
      f"{name:<8} {c['before_cold']:11.1f} {c['before_warm']:11.1f} {c['after_cold']:10.1f} "
      f"{c['after_warm']:10.1f} {ref:9.1f} "
      f"{c['ra_before']:6.2f}/{c['ra_after']:6.2f}/{c['ra_ref']:6.2f}{'':>2} "
      f"{100 * c['agree_after']:8.1f}%"
    )
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump({"combined": combined, "runs": runs}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
