"""Runs one launch entry point several times in one process (for the smoke tests).

  python tests/launch_chain.py MODULE '[["--flag=a", ...], ["--flag=b", ...]]'

Each run is what ``python -m MODULE ARGS`` does: absl flags (and ml_collections' ``--config.*``
overrides) parsed from ``[MODULE, *ARGS]`` with the module's own parser, then ``MODULE.main``.
Before the second and later runs the flags are reset to their defaults and the previous
run's ``--config.*`` override flags are removed. One JAX start-up (and the compiles the runs
share) instead of one per command: the suite runs on a 2-core CPU. After each run it prints
``[chain] ok <i> <seconds> s`` to stdout; the first failure ends the process non-zero.
"""

import importlib
import json
import sys
import time

from absl import app, flags


def main():
  module_name, runs = sys.argv[1], json.loads(sys.argv[2])
  if not runs:
    raise SystemExit("no runs given")
  module = importlib.import_module(module_name)
  # launch.train/evaluate parse with launch.common.parse_flags (clear messages for unknown
  # --config fields); the other entry points with absl's default parser.
  parser = getattr(getattr(module, "common", None), "parse_flags", None) or flags.FLAGS

  def parse(args):
    sys.argv = [module_name, *args]  # ml_collections finds its --config.* overrides in sys.argv
    return parser(sys.argv)

  def chain(argv):
    for i, args in enumerate(runs):
      t0 = time.time()
      if i:
        flags.FLAGS.unparse_flags()
        for name in [n for n in flags.FLAGS if n.startswith("config.")]:
          delattr(flags.FLAGS, name)
        argv = parse(args)
      result = module.main(argv)
      if result not in (None, 0):
        raise SystemExit(f"[chain] run {i} of {module_name} returned {result!r}")
      print(f"[chain] ok {i} {time.time() - t0:.1f} s", flush=True)

  app.run(chain, argv=[module_name], flags_parser=lambda _: parse(runs[0]))


if __name__ == "__main__":
  main()
