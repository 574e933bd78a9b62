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
