"""grain input pipeline: shuffled, augmented, host-sharded training batches; padded
evaluation batches; and their transfer to global `jax.Array`s.

Batches are dicts {'image': float32 [b, H, W, C] in [0, 1], 'label': int32 [b]}
(evaluation batches add 'mask': float32 [b]).

Design: grain shuffles and batches example *indices*, and one map per batch gathers and
augments the examples with numpy. grain's per-record Python overhead (~60 us per record
and transform) would otherwise dominate; this keeps grain's exact, checkpointable
iterator state (`get_state`/`set_state`) at a fraction of the cost.
"""

import copy
import queue
import threading
from typing import Any, Iterator

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils

from agad.data.sources import ArraySource, RandomAccessSource, SubsetSource, TfdsSource

Batch = dict[str, np.ndarray]

# Augmentation name -> zero-padding of the random crop (None: no augmentation). Zero
# padding + crop + horizontal flip is torchvision's `RandomCrop(size, padding=p)` +
# `RandomHorizontalFlip()`, as in the TRADES / Madry et al. PyTorch code.
AUGMENTATIONS = {"none": None, "pad4_crop_flip": 4, "pad8_crop_flip": 8}


def read_batch(source: RandomAccessSource, indices: np.ndarray) -> Batch:
  """Gathers examples: {'image': uint8 [b, H, W, C], 'label': int32 [b]}."""
  if isinstance(source, ArraySource):
    return {"image": source.images[indices], "label": source.labels[indices]}
  if isinstance(source, SubsetSource):  # Keeps the parent's fast batched read.
    return read_batch(source.parent, source.indices[indices])
  indices = [int(i) for i in indices]
  examples = None
  if isinstance(source, TfdsSource) and indices:
    try:  # ArrayRecord reads a batch in one call, much faster than one by one.
      examples = source.tfds_source.__getitems__(indices)
    except TypeError:  # tfds.testing.mock_data's source has no batched read.
      pass
  if examples is None:
    examples = [source[i] for i in indices]
  # An empty read (a host's all-padding eval share) still needs the image shape.
  images = [np.asarray(e["image"], np.uint8) for e in examples or [source[0]]]
  return {
    "image": np.stack(images)[: len(indices)],
    "label": np.array([e["label"] for e in examples], np.int32),
  }


def pad_crop_flip(
  images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, padding: int
) -> np.ndarray:
  """Zero-pads, crops at `offsets` and mirrors where `flips`.

  Args:
    images: [b, H, W, C].
    offsets: int [b, 2], the crop's top-left (row, col) in the padded image, in
      [0, 2 * padding].
    flips: bool [b], mirror left-right.
    padding: pixels of zeros on each side.

  Returns:
    [b, H, W, C], same dtype.
  """
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  rows = offsets[:, :1] + np.arange(h)
  cols = offsets[:, 1:] + np.arange(w)
  cols = np.where(flips[:, None], cols[:, ::-1], cols)
  return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _to_float(batch: Batch) -> Batch:
  return {
    "image": batch["image"].astype(np.float32) / np.float32(255),
    "label": batch["label"].astype(np.int32),
  }


def steps_per_epoch(source_len: int, global_batch_size: int) -> int:
  """Full global batches per pass over `source_len` examples.

  The training stream never drops examples: the remainder of one epoch opens the next.
  """
  if source_len < global_batch_size:
    raise ValueError(
      f"global_batch_size={global_batch_size} exceeds the {source_len} "
      "training examples; lower the batch size or raise max_train."
    )
  return source_len // global_batch_size


def _per_host_batch(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
      f"global_batch_size={global_batch_size} must be a positive multiple "
      f"of process_count={process_count}; change the batch size."
    )
  return global_batch_size // process_count


def train_iterator(
  source: RandomAccessSource,
  *,
  global_batch_size: int,
  seed: int,
  augment: str = "none",
  process_index: int = 0,
  process_count: int = 1,
  num_threads: int = 2,
  prefetch_buffer_size: int = 4,
) -> grain.DatasetIterator:
  """Endless, checkpointable iterator of this host's training batches.

  Every epoch is a fresh permutation (grain's index shuffle reseeds per epoch, i.e.
  uses seed + epoch). Global batch k is stream positions [k*B, (k+1)*B); host p reads
  its contiguous rows [p*B/P, (p+1)*B/P), the rows of the global array that its devices
  hold (``shard_batch``), so the global batches, their order and their augmentation do
  not depend on the number of hosts, and every host's iterator state is the same.

  Args:
    source: random-access split.
    global_batch_size: B, summed over hosts.
    seed: shuffle and augmentation seed.
    augment: a key of AUGMENTATIONS (usually `info.augment`).
    process_index, process_count: this host (`jax.process_index()`) and host count.
    num_threads: grain threads preparing batches (0: in the caller's thread).
    prefetch_buffer_size: batches grain keeps ready.

  Returns:
    grain DatasetIterator of {'image': float32 [B/P, H, W, C], 'label': int32 [B/P]},
    with `get_state()`/`set_state(state)` for exact resumption.
  """
  if augment not in AUGMENTATIONS:
    raise ValueError(f"unknown augment={augment!r}; valid: {sorted(AUGMENTATIONS)}.")
  if len(source) == 0:
    raise ValueError("cannot train on an empty source; check max_train and val_size.")
  local_batch = _per_host_batch(global_batch_size, process_count)
  padding = AUGMENTATIONS[augment]

  def make_batch(step: int, indices: np.ndarray) -> Batch:
    batch = read_batch(
      source, indices[process_index * local_batch : (process_index + 1) * local_batch]
    )
    if padding is not None:
      # One RNG per global batch, shared by all hosts; each takes its own rows.
      rng = np.random.default_rng((seed, step))
      offsets = rng.integers(0, 2 * padding + 1, (global_batch_size, 2))
      flips = rng.random(global_batch_size) < 0.5
      mine = slice(process_index * local_batch, (process_index + 1) * local_batch)
      batch["image"] = pad_crop_flip(batch["image"], offsets[mine], flips[mine], padding)
    return _to_float(batch)

  dataset = (
    grain.MapDataset.range(len(source))
    .shuffle(seed)
    .repeat()
    .batch(global_batch_size, drop_remainder=True, batch_fn=np.array)
    .map_with_index(make_batch)
  )
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
  return iter(dataset.to_iter_dataset(options))


class EvalBatches:
  """Re-iterable, in-order evaluation batches over a split (or a subset of it).

  Each global batch has `batch_size` examples, except the last, which holds the
  remainder zero-padded up to a multiple of `multiple_of` (or up to `batch_size` with
  `full_batches`, so a jitted step compiles once). Batches are
  {'image': float32 [b, H, W, C], 'label': int32 [b], 'mask': float32 [b]}, mask 1.0
  on real examples; b is this host's share (global size / process_count).

  Attributes:
    num_examples: real examples over all hosts (the denominator of accuracies).
  """

  def __init__(
    self,
    source: RandomAccessSource,
    *,
    batch_size: int,
    multiple_of: int = 1,
    indices=None,
    full_batches: bool = False,
    process_index: int = 0,
    process_count: int = 1,
  ):
    if batch_size % multiple_of or multiple_of % process_count:
      raise ValueError(
        f"batch_size={batch_size} must be a multiple of multiple_of="
        f"{multiple_of} (the device count), itself a multiple of "
        f"process_count={process_count}; round the batch size."
      )
    self.source = source
    self.indices = np.arange(len(source)) if indices is None else np.asarray(indices)
    if self.indices.size and not (0 <= self.indices.min() and self.indices.max() < len(source)):
      raise ValueError(
        f"indices must lie in [0, {len(source)}), got [{self.indices.min()}, {self.indices.max()}]."
      )
    self.num_examples = len(self.indices)
    self.batch_size, self.multiple_of = batch_size, multiple_of
    self.full_batches = full_batches
    self.process_index, self.process_count = process_index, process_count

  def __len__(self) -> int:
    return -(-self.num_examples // self.batch_size)

  def __iter__(self) -> Iterator[Batch]:
    for start in range(0, self.num_examples, self.batch_size):
      real = min(self.batch_size, self.num_examples - start)
      size = (
        self.batch_size if self.full_batches else -(-real // self.multiple_of) * self.multiple_of
      )
      share = size // self.process_count
      position = start + self.process_index * share + np.arange(share)
      is_real = position < start + real
      batch = read_batch(self.source, self.indices[position[is_real]])
      pad = share - is_real.sum()
      # Real rows come first within each host's share, as `position` is increasing.
      batch = {
        k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in batch.items()
      }
      yield {**_to_float(batch), "mask": is_real.astype(np.float32)}


def eval_batches(
  source: RandomAccessSource,
  *,
  batch_size: int,
  multiple_of: int = 1,
  indices=None,
  full_batches: bool = False,
  process_index: int = 0,
  process_count: int = 1,
) -> EvalBatches:
  """In-order padded evaluation batches; see EvalBatches (`.num_examples` = n)."""
  return EvalBatches(
    source,
    batch_size=batch_size,
    multiple_of=multiple_of,
    indices=indices,
    full_batches=full_batches,
    process_index=process_index,
    process_count=process_count,
  )


def shard_batch(batch: Any, sharding: jax.sharding.Sharding, *, whole: bool = False) -> Any:
  """Numpy batch -> global jax.Arrays.

  By default ``batch`` is this host's rows (``train_iterator``, ``eval_batches`` with
  ``process_index``/``process_count``): the global array concatenates the hosts' rows in
  process order. ``whole``: every host passes the same whole global batch and its devices
  take their rows from it (one process: the same thing)."""
  if whole:
    return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x, x.shape), batch
    )
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def to_host(x: Any) -> Any:
  """Global jax.Arrays -> numpy on every host: the whole array, also when it is sharded
  over several processes (gathered from the other hosts)."""

  def get(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable and not a.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)

  return jax.tree.map(get, x)


class _Failure:
  def __init__(self, error: BaseException):
    self.error = error


_END = object()


class DevicePrefetcher:
  """Keeps `size` sharded batches ahead of the consumer in a background thread.

  Checkpointing stays exact: the thread records the underlying iterator's state right
  after producing each batch, and `get_state()` returns the state recorded with the
  last batch *consumed* (the initial state before any), i.e. the state whose next
  batch is the next one `__next__` returns. Exceptions in the thread re-raise in
  `__next__`.
  """

  def __init__(self, iterator, size: int, sharding: jax.sharding.Sharding):
    if size < 1:
      raise ValueError(f"prefetch size={size} must be >= 1.")
    self._iterator, self._size, self._sharding = iterator, size, sharding
    self._start(copy.deepcopy(iterator.get_state()))

  def _start(self, state):
    self._state = state
    self._queue = queue.Queue(maxsize=self._size)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._produce, daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def _produce(self):
    try:
      for batch in self._iterator:
        item = (shard_batch(batch, self._sharding), copy.deepcopy(self._iterator.get_state()))
        if not self._put(item):
          return
      self._put(_END)
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in __next__)
      self._put(_Failure(e))

  def __iter__(self):
    return self

  def __next__(self):
    item = self._queue.get()
    if item is _END:
      self._queue.put(_END)  # Stay exhausted on later calls.
      raise StopIteration
    if isinstance(item, _Failure):
      self._queue.put(item)
      raise item.error
    batch, self._state = item
    return batch

  def get_state(self):
    """State of the underlying iterator as of the batches consumed so far."""
    return copy.deepcopy(self._state)

  def set_state(self, state):
    """Drops prefetched batches and resumes the underlying iterator at `state`."""
    self.close()
    self._iterator.set_state(state)
    self._start(copy.deepcopy(state))

  def close(self):
    """Stops the thread (its current batch is discarded)."""
    self._stop.set()
    self._thread.join()


def prefetch_to_device(iterator, size: int, sharding: jax.sharding.Sharding) -> DevicePrefetcher:
  """Wraps a checkpointable host iterator; yields batches of global jax.Arrays."""
  return DevicePrefetcher(iterator, size, sharding)
