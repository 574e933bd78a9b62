"""Draw attention maps of a checkpoint, clean vs PGD-20, and write their ASC/shift statistics.

  python -m launch.attention --workdir=DIR [--compare=DIR2[,DIR3...]] [--site=features]
      [--num_images=16] [--figure_images=8] [--step=best] [--explain=label|predicted]

Takes the first ``num_images`` test images, attacks them with PGD-``steps`` (L-inf, CE,
uniform start) at DIR's ``config.eval.eps`` / ``config.eval.step_size`` on the eval-mode
model (the same attack for the ``--compare`` models), and writes under
``DIR/eval/attention/`` (with ``--compare``: ``attention_<DIR>_vs_<DIR2>/`` beside DIR; or
``--output``):

  examples_<name>_<site>.png      per image (the first figure_images): input, adversarial
                                  (its prediction beside the clean one), each map clean | adv,
                                  a colour bar and a line explaining ASC and the L1 shift
  distributions_<site>.png        ASC (clean, adv) and L1 shift per class (every class, its
                                  image count beside it), one row per run
  side_by_side_<site>.png         with --compare: Grad-CAM of every run, clean | adv
  attention_<site>.json           per run: step, attack, accuracies, ASC and shift stats
                                  overall and per class (agad.attention.study.summary)

Maps: Grad-CAM and channel mean at any site, CAM where the site is followed by GAP + a
linear classifier (not SmallCNN). See agad/attention/study.py for the definitions.
"""

import json
import os

from absl import app, flags, logging

from launch import common

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/ and config.json.")
flags.DEFINE_list(
  "compare",
  None,
  "Workdirs shown beside the first, comma-separated (e.g. "
  "standard training, ATAT and AGKD-BML vs PGD-AT).",
)
flags.DEFINE_string(
  "site",
  "features",
  "Site of the maps (any site or unit alias, e.g. "
  "stage2.pre_pool for SmallCNN's 8x8 maps, stage3.unit[-1]).",
)
flags.DEFINE_integer("num_images", 16, "First N test images (all of them enter the statistics).")
flags.DEFINE_integer("figure_images", 8, "Images (rows) drawn in the per-image figures.")
flags.DEFINE_string("step", "best", "Checkpoint of --workdir: best | latest | a step number.")
flags.DEFINE_string("compare_step", "best", "Checkpoint of every --compare workdir.")
flags.DEFINE_enum(
  "explain",
  "label",
  ["label", "predicted"],
  "Class a map explains: the true label (clean and adversarial alike) or each input's prediction.",
)
flags.DEFINE_list(
  "kinds", None, "Map kinds (default: grad_cam, cam where it applies, channel_mean)."
)
flags.DEFINE_integer("steps", 20, "PGD steps.")
flags.DEFINE_integer("seed", 0, "PGD random-start seed.")
flags.DEFINE_string(
  "output",
  None,
  "Output directory (default: WORKDIR/eval/attention; with --compare "
  "attention_<run>_vs_<run2> beside WORKDIR).",
)
flags.mark_flags_as_required(["workdir"])


def run(
  workdir,
  *,
  compare=None,
  site="features",
  num_images=16,
  figure_images=8,
  step="best",
  compare_step="best",
  explain="label",
  kinds=None,
  steps=20,
  seed=0,
  output=None,
  log=print,
) -> dict:
  """Everything ``main`` does; returns ``{"json": path, "figures": [paths], "stats": dict}``."""
  import jax
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  import agad
  from agad.attention import study as study_lib

  compare = [compare] if isinstance(compare, str) else list(compare or [])
  output = output or default_output(workdir, compare)
  os.makedirs(output, exist_ok=True)
  main = agad.load(workdir, step)
  eps, step_size = float(main.config.eval.eps), float(main.config.eval.step_size)
  images, labels = study_lib.test_images(main.splits(), num_images)
  names = study_lib.class_names(main.info.name, main.info.num_classes)
  runs = [(workdir, main)] + [(c, agad.load(c, compare_step)) for c in compare]

  studies, stats, figures = {}, {}, []
  safe_site = site.replace("[", "").replace("]", "").replace(".", "_")
  for name, (path, loaded) in zip(study_lib.run_labels([p for p, _ in runs]), runs):
    key = jax.random.key(seed)
    adv = study_lib.adversarial(
      loaded.logits_fn, images, labels, key, eps=eps, step_size=step_size, steps=steps
    )
    s = study_lib.study(
      loaded.model, loaded.variables, images, labels, adv, site=site, kinds=kinds, explain=explain
    )
    studies[name] = s
    stats[name] = {
      "workdir": os.path.abspath(path),
      "step": int(loaded.step),
      "model": loaded.config.model.name,
      "objective": loaded.config.objective.name,
      "attack": {
        "name": f"pgd-{steps}",
        "norm": "linf",
        "eps": eps,
        "step_size": step_size,
        "steps": steps,
        "seed": seed,
        "bn": "eval",
      },
      **study_lib.summary(s, names),
    }
    fig = study_lib.plot_examples(
      s, names, max_images=figure_images, title=f"{name} (step {loaded.step}), site {s.site}"
    )
    figures.append(os.path.join(output, f"examples_{name}_{safe_site}.png"))
    fig.savefig(figures[-1], dpi=110)
    plt.close(fig)
    a = stats[name]["all"]
    for k in s.kinds:
      flat = stats[name]["constant_maps"][k]
      log(
        f"{name} {k}: ASC clean {a[k]['asc_clean']['mean']:.3f} adv "
        f"{a[k]['asc_adv']['mean']:.3f}, shift l1 {a[k]['shift']['l1']['mean']:.3f} "
        f"iou {a[k]['shift']['iou']['mean']:.3f}"
        + (
          f"; all-zero maps: {flat['clean']} clean, {flat['adv']} adversarial of {len(labels)} "
          "(no gradient reaches the site for that class)"
          if flat["clean"] or flat["adv"]
          else ""
        )
      )

  fig = study_lib.plot_distributions(studies, names)
  figures.append(os.path.join(output, f"distributions_{safe_site}.png"))
  fig.savefig(figures[-1], dpi=110)
  plt.close(fig)
  if compare:
    fig = study_lib.plot_side_by_side(studies, names, max_images=figure_images)
    figures.append(os.path.join(output, f"side_by_side_{safe_site}.png"))
    fig.savefig(figures[-1], dpi=110)
    plt.close(fig)
  result = {"site": site, "num_images": int(len(labels)), "runs": stats}
  path = os.path.join(output, f"attention_{safe_site}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  return {"json": path, "figures": figures, "stats": result}


def default_output(workdir: str, compare=()) -> str:
  """``WORKDIR/eval/attention`` for one run; with ``--compare``, a folder of its own beside
  the first workdir (``attention_<a>_vs_<b>...``), not inside either run."""
  if not compare:
    return os.path.join(workdir, "eval", "attention")
  from agad.attention import study as study_lib

  labels = study_lib.run_labels([workdir, *compare])
  return os.path.join(os.path.dirname(os.path.abspath(workdir)), "attention_" + "_vs_".join(labels))


def main(argv):
  if len(argv) > 1:
    common.fatal(f"unexpected arguments: {argv[1:]} (flags take the form --name=value)")
  common.init_runtime()
  with common.refuse_bad_input():  # Bad flags are refused before anything is written, in one line.
    common.check_attention_flags(
      workdir=FLAGS.workdir,
      compare=FLAGS.compare,
      site=FLAGS.site,
      num_images=FLAGS.num_images,
      figure_images=FLAGS.figure_images,
      step=FLAGS.step,
      compare_step=FLAGS.compare_step,
      explain=FLAGS.explain,
      kinds=FLAGS.kinds,
      steps=FLAGS.steps,
      seed=FLAGS.seed,
      output=FLAGS.output,
    )
  out = run(
    FLAGS.workdir,
    compare=FLAGS.compare,
    site=FLAGS.site,
    num_images=FLAGS.num_images,
    figure_images=FLAGS.figure_images,
    step=FLAGS.step,
    compare_step=FLAGS.compare_step,
    explain=FLAGS.explain,
    kinds=FLAGS.kinds,
    steps=FLAGS.steps,
    seed=FLAGS.seed,
    output=FLAGS.output,
    log=logging.info,
  )
  for path in out["figures"]:
    logging.info("figure %s", path)
  logging.info("statistics written to %s", out["json"])


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
