"""Square Attack's host-side tables: the p schedule, square sides and L2 window patterns.

Pure numpy, computed once per attack call (outside any trace) and used by
``agad.attacks.square``. Constants follow fra31/auto-attack ``square.py``: ``p`` starts
at ``p_init`` and halves after queries 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000
(rescaled to a 10000-query budget only if ``rescale_schedule``); the L2 window pattern
is the reference's ``eta(s)`` / ``meta_pseudo_gaussian_pert``.
"""

from __future__ import annotations

import math

import numpy as np

NORMS = ("linf", "l2")
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_p(
  iteration: int, p_init: float = 0.8, n_queries: int = 5000, rescale_schedule: bool = False
) -> float:
  """The fraction p of the image a square covers at 0-based query ``iteration``."""
  it = int(iteration / n_queries * 10000) if rescale_schedule else iteration
  halvings = sum(it > threshold for threshold in _HALVINGS)
  return p_init / 2**halvings


def square_sizes(
  height: int,
  width: int,
  n_queries: int,
  p_init: float = 0.8,
  rescale_schedule: bool = False,
  norm: str = "linf",
) -> np.ndarray:
  """Square side for every query ``[n_queries]`` int32 (Python ``round``, as the reference).

  L-inf: ``max(round(sqrt(p H W)), 1)``; L2: ``max(round(sqrt(p H W)), 3)``, plus one if
  even; both capped at ``min(H, W)`` (last, so an L2 side can be even).
  """
  if norm not in NORMS:
    raise ValueError(f"norm {norm!r} is not one of {NORMS}")
  sizes = []
  for it in range(n_queries):
    p = square_p(it, p_init, n_queries, rescale_schedule)
    side = int(round(math.sqrt(p * height * width)))
    if norm == "linf":
      side = max(side, 1)
    else:
      side = max(side, 3)
      side += 1 - side % 2
    sizes.append(min(side, height, width))
  return np.asarray(sizes, np.int32)


def _pert_rectangle(rows: int, cols: int) -> np.ndarray:
  """``[rows, cols]`` nested rectangles around the centre ``(rows // 2, cols // 2)``.

  Ring k (Chebyshev distance k from the centre, cropped to the rectangle) adds
  ``1 / (k + 1)^2`` to itself and every ring outside it, up to ``max(rows, cols) // 2``:
  entry = ``sum_{k = dist}^{K - 1} 1 / (k + 1)^2``. Unit L2 norm.
  """
  n_rings = max(rows // 2, cols // 2) + 1
  tail = np.cumsum((1.0 / np.arange(1, n_rings + 1) ** 2)[::-1])[::-1]  # tail[m] = sum_{k>=m}
  dist = np.maximum(
    np.abs(np.arange(rows)[:, None] - rows // 2), np.abs(np.arange(cols)[None, :] - cols // 2)
  )
  values = tail[dist] if rows and cols else np.zeros((rows, cols))
  return values / max(np.sqrt(np.sum(values**2)), 1e-300)


def meta_pseudo_gaussian_pert(side: int) -> np.ndarray:
  """The L2 Square window pattern ``[side, side]`` float64, unit L2 norm.

  Top ``side // 2`` rows: a rectangle of nested rings (``_pert_rectangle``); bottom
  rows: minus one. The reference's ``eta(s)`` (fra31/auto-attack) and
  ``meta_pseudo_gaussian_pert`` (the Square Attack code) before their random transpose.
  """
  top = _pert_rectangle(side // 2, side)
  bottom = -_pert_rectangle(side - side // 2, side)
  pattern = np.concatenate([top, bottom], axis=0)
  return pattern / np.sqrt(np.sum(pattern**2))


def _l2_patterns(sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Patterns of every distinct side, zero-padded: ``[U, S, S]`` float32, index ``[Q]``."""
  distinct = sorted(set(int(v) for v in sizes)) or [1]  # [1]: no queries at all
  largest = max(distinct)
  table = np.zeros((len(distinct), largest, largest), np.float32)
  for i, side in enumerate(distinct):
    table[i, :side, :side] = meta_pseudo_gaussian_pert(side)
  index = np.searchsorted(np.asarray(distinct), sizes).astype(np.int32)
  return table, index


def l2_start_tiles(height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The tiles of the L2 start: one-hot ``[T, H, W]`` and the pattern maps ``[H, W]``.

  Tiles of side ``s = H // 5`` (1 for ``H < 5``) from row and column ``(H - 5 s) // 2``,
  ``H // s`` rows by ``W // s`` columns, cropped to the image. Returns the tile one-hot,
  and every tile's pattern placed in the image, as drawn and transposed (float32).
  """
  side = max(height // 5, 1)
  offset = max((height - 5 * side) // 2, 0)
  pattern = meta_pseudo_gaussian_pert(side)
  masks, plain, flipped = [], np.zeros((height, width)), np.zeros((height, width))
  for i in range(height // side):
    top = offset + i * side
    for j in range(width // side):
      left = offset + j * side
      rows, cols = min(side, height - top), min(side, width - left)
      if rows <= 0 or cols <= 0:
        continue
      mask = np.zeros((height, width), bool)
      mask[top : top + rows, left : left + cols] = True
      masks.append(mask)
      plain[top : top + rows, left : left + cols] = pattern[:rows, :cols]
      flipped[top : top + rows, left : left + cols] = pattern.T[:rows, :cols]
  return (np.stack(masks).astype(np.float32), plain.astype(np.float32), flipped.astype(np.float32))
