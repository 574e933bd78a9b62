"""Orbax options for reads that one process of a multi-process run makes alone."""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp


def this_process_only() -> ocp.options.MultiprocessingOptions:
  """Orbax options for a read one process makes alone (``Checkpointer(local=True)``,
  ``read_state``, ``resolve_step``): no barrier with the other processes, which may not
  be reading at all. A training run's saves and restores stay collective."""
  me = jax.process_index()
  return ocp.options.MultiprocessingOptions(
    primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"agad_read_p{me}"
  )
