"""Reader for the IDX format used by MNIST and Fashion-MNIST.

Layout (all integers big-endian): two zero bytes, one dtype code, one byte `ndim`,
`ndim` uint32 dimension sizes, then the row-major payload.
"""

import gzip
import os

import numpy as np

# The standard IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
IDX_DTYPES = {
  0x08: np.dtype("u1"),
  0x09: np.dtype("i1"),
  0x0B: np.dtype(">i2"),
  0x0C: np.dtype(">i4"),
  0x0D: np.dtype(">f4"),
  0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file, gzipped (by magic bytes, not by name) or raw.

  Args:
    path: file path.

  Returns:
    array of shape [d0, ..., d_{ndim-1}] in native byte order; uint8 for image files
    (e.g. [60000, 28, 28]) and label files ([60000]).
  """
  with open(path, "rb") as f:
    data = f.read()
  if data[:2] == b"\x1f\x8b":  # gzip magic; Debian ships .gz, the original site both.
    data = gzip.decompress(data)
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
    raise ValueError(
      f"{path} is not an IDX file: magic bytes {data[:4].hex()} should be "
      f"00 00 <type in {sorted(f'{c:02x}' for c in IDX_DTYPES)}> <ndim>; "
      "check the path or re-download the file."
    )
  dtype, ndim = IDX_DTYPES[data[2]], data[3]
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, offset=4))
  offset = 4 + 4 * ndim
  expected = offset + int(np.prod(shape)) * dtype.itemsize
  if len(data) != expected:
    raise ValueError(
      f"{path}: header says shape {shape} ({expected} bytes) but the "
      f"file has {len(data)} bytes; the file is truncated or corrupt, "
      "re-download it."
    )
  array = np.frombuffer(data, dtype, offset=offset).reshape(shape)
  return array.astype(dtype.newbyteorder("="))
