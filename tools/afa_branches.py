"""Dev tool: a stage-I AFA run's accuracy under fixed branch routings (the stage-II ceiling).

    python tools/afa_branches.py --workdir=<stage-I run> [--num_examples=500]
        [--eps=0,0.25,0.5,1] [--step=latest] [--output=sweep.json]

For each routing (each branch alone; ``w BN_0 + (1 - w) BN_{K-1}`` for w = 0.75, 0.5,
0.25) and each eps (fractions of the run's ``attack.eps``; 0 = clean): white-box PGD-20
through that routing on the first N test images (``_afa_analysis.fixed_mix_sweep``).
Prints a Markdown table with standard errors and the best routing per eps. Stage II's
weight generator can only beat the best single routing if the best routing differs
between clean and attacked inputs.
"""

from __future__ import annotations

import json

from absl import app, flags
import jax
import numpy as np

import agad
from agad.defenses import _afa_analysis, afa
from agad.objectives import defaults

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A stage-I run (objective afa).", required=True)
flags.DEFINE_string(
  "step", "latest", "Checkpoint: latest (what stage II starts from), best or a number."
)
flags.DEFINE_integer("num_examples", 500, "First N test images.")
flags.DEFINE_list("eps", ["0", "0.25", "0.5", "1"], "Strengths as fractions of attack.eps.")
flags.DEFINE_integer("steps", 20, "PGD steps.")
flags.DEFINE_integer("seed", 0, "Attack key.")
flags.DEFINE_string("output", None, "Optional JSON of the accuracies.")


def main(argv):
  del argv
  run = agad.load(FLAGS.workdir, FLAGS.step if not FLAGS.step.isdigit() else int(FLAGS.step))
  if run.config.objective.name != "afa":
    raise app.UsageError(
      f"--workdir={FLAGS.workdir} trained {run.config.objective.name!r}; "
      "give a stage-I run (objective afa)"
    )
  test = run.splits().test
  n = min(FLAGS.num_examples, len(test.labels))
  images = np.asarray(test.images[:n], np.float32) / np.float32(255)
  labels = np.asarray(test.labels[:n])
  eps_unit = float(run.config.attack.eps)
  eps = [float(e) * eps_unit for e in FLAGS.eps]
  k = int(defaults.objective_config(run.config, "afa", afa.DEFAULTS).num_branches)
  out = _afa_analysis.fixed_mix_sweep(
    run.model,
    run.variables,
    images,
    labels,
    jax.random.key(FLAGS.seed),
    mixes=_afa_analysis.default_mixes(k),
    eps_values=eps,
    steps=FLAGS.steps,
  )
  se = lambda p: 100 * np.sqrt(p * (1 - p) / n)
  print(
    f"{FLAGS.workdir} step {run.step}: fixed routings, PGD-{FLAGS.steps}, first {n} test images"
  )
  print("| routing | " + " | ".join("clean" if e == 0 else f"eps {e:g}" for e in eps) + " |")
  print("|---" * (len(eps) + 1) + "|")
  for name, acc in zip(out["names"], out["accuracy"]):
    print(f"| {name} | " + " | ".join(f"{100 * a:.1f} +- {se(a):.1f}" for a in acc) + " |")
  best = [out["names"][i] for i in out["accuracy"].argmax(0)]
  print(
    "| best routing | "
    + " | ".join(f"{100 * a:.1f} ({b})" for a, b in zip(out["best_fixed"], best))
    + " |"
  )
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump(
        {
          "workdir": FLAGS.workdir,
          "step": run.step,
          "n": n,
          "eps": eps,
          "names": out["names"],
          "accuracy": out["accuracy"].tolist(),
          "best_fixed": out["best_fixed"].tolist(),
        },
        f,
        indent=1,
      )


if __name__ == "__main__":
  app.run(main)
