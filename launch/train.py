"""Train a model: ``python -m launch.train --config=configs/fashion_mnist.py --workdir=DIR``.

Resumes from the latest checkpoint in ``--workdir``; re-running a finished workdir
exits 0 promptly. Override any field: ``--config.optim.lr=0.05``.
"""

from absl import app, flags
from ml_collections import config_flags

from launch import common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/fashion_mnist.py:smallcnn,pgd_at.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the run record.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.init_runtime()
  from agad.training import builders, loop
  with common.refuse_bad_input():  # Bad input is refused before any work, in one line.
    common.check_train_config(FLAGS.config)  # every field, in milliseconds
    builders.preflight(FLAGS.config)  # sites, norms, the objective: abstract shapes, no data
  from agad import checkpoint
  try:
    loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (loop.NonFiniteError, checkpoint.WorkdirWriteError) as e:
    common.fatal(e)  # the message names the step or path, what is kept and the fix


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
