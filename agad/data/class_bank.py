"""Training images grouped by class, sampled and augmented inside a jitted step.

Some defenses (AGKD-BML: an image of each example's "most confusing class") need, per
example, a random *training* image of a requested class, augmented exactly like the
training pipeline augments. `ClassBank.from_source` reads a split once into device
arrays sorted by class; `sample_by_class(bank, classes, key)` draws one uniform member
of each requested class and applies `augment_jax`, the JAX twin of the pipeline's
`pad_crop_flip` (same padding, crop offsets uniform in [0, 2 * padding], flip with
probability 1/2), and converts to float32 in [0, 1] bitwise as the pipeline does.

Pass the bank to the jitted step as an *argument* (it is a pytree): closing over it
would embed the whole split as a constant in the compiled program. Keep it out of the
TrainState too, or every checkpoint would hold a copy of the training set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from agad.data.pipeline import AUGMENTATIONS, read_batch
from agad.data.sources import RandomAccessSource

# uint8 value -> float32, computed by numpy exactly as the pipeline's `_to_float`
# (x.astype(float32) / float32(255)). A table lookup in JAX reproduces it bitwise on
# every backend, whatever the compiler does with a division by a constant.
_UINT8_TO_FLOAT = np.arange(256, dtype=np.float32) / np.float32(255)

_READ_CHUNK = 4096  # Examples per read while building a bank.


@struct.dataclass
class ClassBank:
  """A split's images sorted by class (a pytree: pass it to jit as an argument).

  Class c's images are `images[starts[c] : starts[c] + counts[c]]`, in source order.

  Attributes:
    images: uint8 [N, H, W, C], as stored by the source, sorted by label (stable).
    starts: int32 [K], first row of each class (for an empty class: where it would be).
    counts: int32 [K], examples of each class.
    num_classes: K (static).
    augment: a key of `pipeline.AUGMENTATIONS`, applied by `sample_by_class` (static).
    allow_empty: whether classes with no example were accepted (static); see
      `sample_by_class` for what drawing one returns.
  """

  images: jax.Array
  starts: jax.Array
  counts: jax.Array
  num_classes: int = struct.field(pytree_node=False)
  augment: str = struct.field(pytree_node=False)
  allow_empty: bool = struct.field(pytree_node=False, default=False)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of every image."""
    return tuple(self.images.shape[1:])

  @property
  def num_examples(self) -> int:
    """N, examples over all classes."""
    return self.images.shape[0]

  @classmethod
  def from_source(
    cls,
    source: RandomAccessSource,
    num_classes: int,
    *,
    augment: str,
    allow_empty: bool = False,
    sharding: jax.sharding.Sharding | None = None,
  ) -> ClassBank:
    """Reads every example of `source` (a training split, possibly a SubsetSource).

    Args:
      source: random-access split: `source[i] -> {'image': uint8 [H, W, C], 'label'}`.
      num_classes: K; every label must lie in [0, K).
      augment: a key of `pipeline.AUGMENTATIONS`, normally `DatasetSplits.info.augment`
        (the training pipeline's augmentation).
      allow_empty: accept classes with no example (default: raise naming them).
      sharding: where to place the arrays (e.g. replicated over the training mesh);
        None: the default device.

    Returns:
      ClassBank holding N = len(source) images (H * W * C bytes each on device).
    """
    if augment not in AUGMENTATIONS:
      raise ValueError(
        f"unknown augment={augment!r}; valid: {sorted(AUGMENTATIONS)} "
        "(pass DatasetSplits.info.augment)."
      )
    if num_classes < 1:
      raise ValueError(
        f"num_classes={num_classes} must be >= 1; pass DatasetSplits.info.num_classes."
      )
    if len(source) == 0:
      raise ValueError(
        "cannot build a ClassBank from an empty source; check max_train and val_size."
      )
    images, labels = [], []
    for start in range(0, len(source), _READ_CHUNK):
      batch = read_batch(source, np.arange(start, min(start + _READ_CHUNK, len(source))))
      images.append(np.asarray(batch["image"]))
      labels.append(np.asarray(batch["label"]))
    images, labels = np.concatenate(images), np.concatenate(labels)
    if images.dtype != np.uint8 or images.ndim != 4:
      raise ValueError(
        f"source images must be uint8 [H, W, C], got {images.dtype} "
        f"{images.shape[1:]}; store them as sources.ArraySource does."
      )
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
      raise ValueError(
        f"label {int(labels[bad][0])} (example {int(np.flatnonzero(bad)[0])}"
        f") is outside [0, num_classes={num_classes}); pass the dataset's "
        "info.num_classes."
      )
    counts = np.bincount(labels, minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if empty.size and not allow_empty:
      raise ValueError(
        f"class {int(empty[0])} has no example in the source (empty "
        f"classes: {empty.tolist()[:20]}{' ...' if empty.size > 20 else ''}"
        f" of {num_classes}); use a larger max_train, or pass "
        "allow_empty=True and mask the draws of empty classes."
      )
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    put = jnp.asarray if sharding is None else lambda x: jax.device_put(x, sharding)
    return cls(
      images=put(images[order]),
      starts=put(starts.astype(np.int32)),
      counts=put(counts.astype(np.int32)),
      num_classes=num_classes,
      augment=augment,
      allow_empty=allow_empty,
    )


def uint8_to_float(images: jax.Array) -> jax.Array:
  """uint8 [...] -> float32 [...] in [0, 1], bitwise equal to the pipeline's batches."""
  if images.dtype != jnp.uint8:
    raise ValueError(
      f"images must be uint8, got {images.dtype}; the pipeline only converts uint8 images."
    )
  return jnp.asarray(_UINT8_TO_FLOAT)[images]


def augment_jax_with(
  images: jax.Array, offsets: jax.Array, flips: jax.Array, padding: int
) -> jax.Array:
  """JAX twin of `pipeline.pad_crop_flip`: zero-pads, crops at `offsets`, mirrors.

  Bitwise equal to `pad_crop_flip(images, offsets, flips, padding)` (pure data movement).

  Args:
    images: [b, H, W, C], any dtype.
    offsets: int [b, 2], the crop's top-left (row, col) in the padded image, in
      [0, 2 * padding] (out-of-range offsets are clamped, unlike numpy).
    flips: bool [b], mirror left-right.
    padding: pixels of zeros on each side (static).

  Returns:
    [b, H, W, C], same dtype.
  """
  _, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jnp.asarray(offsets, jnp.int32)

  def crop(image, offset, flip):
    out = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))
    return jnp.where(flip, out[:, ::-1], out)

  return jax.vmap(crop)(padded, offsets, jnp.asarray(flips, bool))


def augmentation_params(
  key: jax.Array, batch_size: int, kind: str
) -> tuple[jax.Array, jax.Array] | None:
  """Random crop offsets int32 [b, 2] in [0, 2 * padding] and flips bool [b] (p = 1/2).

  The parameterisation of the pipeline's `train_iterator`; None for kind 'none'.
  """
  if kind not in AUGMENTATIONS:
    raise ValueError(f"unknown augmentation kind={kind!r}; valid: {sorted(AUGMENTATIONS)}.")
  padding = AUGMENTATIONS[kind]
  if padding is None:
    return None
  k_offsets, k_flips = jax.random.split(key)
  offsets = jax.random.randint(k_offsets, (batch_size, 2), 0, 2 * padding + 1, jnp.int32)
  flips = jax.random.bernoulli(k_flips, 0.5, (batch_size,))
  return offsets, flips


def augment_jax(images: jax.Array, key: jax.Array, kind: str) -> jax.Array:
  """The training augmentation `kind` (a key of AUGMENTATIONS), in JAX.

  Args:
    images: [b, H, W, C], any dtype.
    key: PRNG key (typed or raw).
    kind: 'none' returns `images` unchanged; 'padP_crop_flip' zero-pads P pixels, crops
      at offsets uniform in [0, 2P]^2 and mirrors with probability 1/2, per image.

  Returns:
    [b, H, W, C], same dtype.
  """
  params = augmentation_params(key, images.shape[0], kind)
  if params is None:
    return images
  return augment_jax_with(images, *params, AUGMENTATIONS[kind])


def sample_by_class(bank: ClassBank, classes: jax.Array, key: jax.Array) -> dict:
  """One uniform random training image of each requested class, augmented.

  Jit- and vmap-safe; the bank is an ordinary argument (no retrace for a new key).

  Args:
    bank: ClassBank.
    classes: int [B], each in [0, bank.num_classes) (out-of-range ids are clamped by
      the gathers, not checked).
    key: PRNG key (typed or raw).

  Returns:
    {'image': float32 [B, H, W, C] in [0, 1], augmented with `bank.augment` exactly
     as the training pipeline would (same conversion to float, bitwise),
     'label': int32 [B] (= classes),
     'mask': float32 [B], 1.0 where the class has examples. Only a bank built with
     allow_empty=True can hold 0.0 entries; their image is all zeros.}
  """
  classes = jnp.asarray(classes, jnp.int32)
  if classes.ndim != 1:
    raise ValueError(f"classes must be int [B], got shape {classes.shape}; vmap over extra axes.")
  k_index, k_augment = jax.random.split(key)
  counts, starts = bank.counts[classes], bank.starts[classes]
  # randint with per-example bounds: uniform on [0, count) (and 0 for an empty class).
  within = jax.random.randint(k_index, classes.shape, 0, jnp.maximum(counts, 1), jnp.int32)
  rows = jnp.minimum(starts + within, bank.num_examples - 1)
  images = augment_jax(bank.images[rows], k_augment, bank.augment)
  present = counts > 0
  images = uint8_to_float(images)
  if bank.allow_empty:
    images = jnp.where(present[:, None, None, None], images, 0.0)
  return {"image": images, "label": classes, "mask": present.astype(jnp.float32)}
