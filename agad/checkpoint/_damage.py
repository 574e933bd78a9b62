"""Is a saved checkpoint step intact? Structural checks and an optional read of every array."""

from __future__ import annotations

import json
import os

import tensorstore as ts

from ._write_errors import _short

COMMIT_MARKER = "commit_success.txt"  # written by orbax once a step is fully committed
ITEMS = ("state", "data", "meta")


def damage(directory: str, step: int, *, read_arrays: bool = False) -> str | None:
  """Why saved ``step`` of checkpoint ``directory`` is damaged, or None if it looks intact.

  Structural checks (no array is read): the commit marker and ``_CHECKPOINT_METADATA``
  exist, every item folder exists, ``meta/metadata``, ``data/metadata`` and
  ``state/_METADATA`` parse as JSON, ``state/manifest.ocdbt`` exists. With
  ``read_arrays``, also every value of the state's OCDBT store is read once (finds a
  truncated or missing array file; costs one read of the checkpoint's bytes).
  """
  root = os.path.join(os.path.abspath(directory), str(step))
  for name in (COMMIT_MARKER, "_CHECKPOINT_METADATA"):
    if not os.path.isfile(os.path.join(root, name)):
      return f"{name} missing: the save never completed"
  for item in ITEMS:
    if not os.path.isdir(os.path.join(root, item)):
      return f"item {item!r} missing"
  for relative in ("meta/metadata", "data/metadata", "state/_METADATA"):
    path = os.path.join(root, relative)
    try:
      with open(path) as f:
        json.load(f)
    except (OSError, ValueError) as e:
      return f"{relative} unreadable: {_short(e)}"
  if not os.path.isfile(os.path.join(root, "state", "manifest.ocdbt")):
    return "state/manifest.ocdbt missing"
  return _unreadable_arrays(os.path.join(root, "state")) if read_arrays else None


def _unreadable_arrays(state_dir: str, batch: int = 64) -> str | None:
  """Reads every value of the OCDBT store in ``state_dir`` (``batch`` at a time); the error or None."""
  try:
    store = ts.KvStore.open({"driver": "ocdbt", "base": "file://" + state_dir + os.sep}).result()
    keys = store.list().result()
    if not keys:
      return "state/ holds no arrays"
    for start in range(0, len(keys), batch):
      for future in [store.read(k) for k in keys[start : start + batch]]:
        if future.result().state != "value":
          return "an array file is missing"
  except Exception as e:  # noqa: BLE001  (tensorstore raises ValueError with its status)
    # 'OUT_OF_RANGE: ... of local file "d/266f..."': the status and the file, not the folder.
    return f"state unreadable: {_short(e, typed=False).replace(state_dir + os.sep, '')}"
  return None


def _listdir(directory: str) -> list[str]:
  try:
    return os.listdir(directory)
  except OSError:
    return []
