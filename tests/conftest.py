"""Test set-up: 4 fake CPU devices, configured before anything initialises JAX."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
# Tests compile many tiny programs: cheaper compiles matter more than fast code.
jax.config.update("jax_disable_most_optimizations", True)
