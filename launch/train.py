"""Train a model: ``python -m launch.train --config=configs/fashion_mnist.py --workdir=DIR``.

Resumes from the latest checkpoint in ``--workdir``; re-running a finished workdir
exits 0 promptly. Override any field: ``--config.optim.lr=0.05``; float fields take
fractions (``--config.attack.step_size=2/255``), and ``--config.eps=8/255`` sets the
training, validation and evaluation radii at once (each unless overridden itself).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from launch import common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/fashion_mnist.py:smallcnn,pgd_at.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the run record.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    common.fatal(f"unexpected arguments: {argv[1:]} (flags take the form --name=value)")
  common.init_runtime()
  from agad import defenses
  from agad.training import builders, loop

  with common.refuse_bad_input():  # Bad input is refused before any work, in one line.
    radii = common.resolve_radii(FLAGS.config, common.explicit_overrides())  # --config.eps
    common.check_train_config(FLAGS.config)  # every field, in milliseconds
    builders.preflight(FLAGS.config)  # sites, norms, the objective: abstract shapes, no data
  logging.info(common.describe_radii(FLAGS.config, radii))
  for name, source in defenses.sources(FLAGS.config.objective.name).items():
    logging.info("%s: %s (sha256 %s)", name, source["file"], source["sha256"][:16])
  from agad import checkpoint

  try:
    loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (loop.NonFiniteError, checkpoint.WorkdirWriteError) as e:
    common.fatal(e)  # the message names the step or path, what is kept and the fix
  import jax

  if jax.process_index() == 0:
    print(common.next_steps(FLAGS.workdir, FLAGS.config), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
