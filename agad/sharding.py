"""One 1-D data mesh over every device of every host (DESIGN.md "Parallelism").

The global batch is sharded on ``'data'``; the train state is replicated. Under
``jax.jit`` linen BatchNorm (no ``axis_name``) then computes global-batch statistics,
i.e. synchronised BN, identical to a single device seeing the whole batch.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def make_mesh(devices=None) -> Mesh:
  """The ``'data'`` mesh over ``devices`` (default: every device, each process's together,
  in process order: host p's rows of a global batch are then rows [pB/P, (p+1)B/P))."""
  if devices is None:
    devices = sorted(
      jax.devices(), key=lambda d: d.process_index
    )  # stable: JAX's order within a process
  devices = np.array(devices)
  # Explicit axis types are the 0.12 default and break eager indexing of outputs.
  return Mesh(devices, ("data",), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def check_divisible(global_batch: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if global_batch % n:
    raise ValueError(
      f"global batch size {global_batch} does not divide by the {n} devices of "
      f"the mesh; use a multiple of {n} (e.g. --config.batch_size={global_batch - global_batch % n or n})"
    )
