"""Shared absl set-up for the launch scripts."""

from __future__ import annotations

import os

from absl import flags, logging

flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() first (multi-host GPU / Cloud TPU pod).")
flags.DEFINE_enum("matmul_precision", None, ["default", "high", "highest"],
                  "jax_default_matmul_precision for every dot and convolution (unset: JAX's "
                  "default, which lets GPUs use TF32 and TPUs bf16 passes for float32). "
                  "'highest' gives full float32 on GPU, as on CPU.")


def init_runtime() -> None:
  """Multi-host initialisation (behind --distributed), matmul precision, logging to stderr."""
  import jax
  if flags.FLAGS.distributed:
    jax.distributed.initialize()
  if flags.FLAGS.matmul_precision:
    jax.config.update("jax_default_matmul_precision", flags.FLAGS.matmul_precision)
  logging.set_verbosity(logging.INFO)
  # Orbax logs every save phase at INFO; keep its warnings, drop its chatter.
  import logging as py_logging
  py_logging.getLogger("absl").addFilter(
      lambda r: r.levelno >= py_logging.WARNING or "orbax" not in r.pathname)
  logging.info("JAX %s: process %d/%d, devices %s (XLA_FLAGS=%r)", jax.__version__,
               jax.process_index(), jax.process_count(), jax.devices(),
               os.environ.get("XLA_FLAGS", ""))


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a clear message for an unknown ``--config.<field>``.

  ml_collections otherwise dies with a raw ``AttributeError: "'learning_rate'"`` traceback.
  """
  import sys
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.stderr.write(f"FATAL Flags parsing error: {e}\nPass --helpfull to see help on flags.\n")
    sys.exit(1)
  except (AttributeError, KeyError) as e:
    sys.stderr.write(unknown_field_message(argv, e) + "\n")
    sys.exit(1)


def unknown_field_message(argv: list[str], error: Exception) -> str:
  """Names the bad ``--config.a.b`` override and the fields that exist at that level."""
  import importlib.util
  name = str(error).strip("\"'")
  bad = [a.split("=", 1)[0][2:] for a in argv if a.startswith("--config.")
         and name in a.split("=", 1)[0].split(".")]
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  known = ""
  if bad and spec:
    path, _, arg = spec.partition(":")
    try:
      module_spec = importlib.util.spec_from_file_location("_agad_config", path)
      module = importlib.util.module_from_spec(module_spec)
      module_spec.loader.exec_module(module)
      node = module.get_config(arg or None)
      for part in bad[0].split(".")[1:-1]:
        node = node[part]
      known = f"; fields of {'.'.join(bad[0].split('.')[:-1])}: {', '.join(sorted(node.keys()))}"
    except Exception:  # the message stays useful without the list
      pass
  where = f"--{bad[0]}" if bad else f"a --config override ({name!r})"
  return f"FATAL unknown config field in {where}{known}"
