"""Tests for agad.data.class_bank: per-class training draws inside jit, augmented like
the pipeline."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agad import data

SHAPE = (6, 6, 2)


def _source(counts, shape=SHAPE, seed=0):
  """ArraySource with `counts[c]` examples of class c in shuffled order; distinct
  random images, so that an image identifies its example."""
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.repeat(np.arange(len(counts)), counts))
  images = rng.integers(0, 256, (len(labels), *shape), dtype=np.uint8)
  return data.ArraySource(images, labels)


def _as_float(images):
  """The pipeline's own conversion, through its public evaluation batches."""
  source = data.ArraySource(images, np.zeros(len(images), np.int32))
  return next(iter(data.eval_batches(source, batch_size=len(images))))["image"]


class _ListSource:
  """A source with only __len__/__getitem__ (the generic read path)."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    return self.source[i]


# --- Building ----------------------------------------------------------------------


def test_from_source_sorts_by_class_and_keeps_uint8():
  counts = [3, 5, 1, 4]
  source = _source(counts)
  bank = data.ClassBank.from_source(source, 4, augment="pad4_crop_flip")
  assert bank.images.dtype == jnp.uint8 and bank.images.shape == (13, *SHAPE)
  assert bank.image_shape == SHAPE and bank.num_examples == 13 and bank.num_classes == 4
  np.testing.assert_array_equal(bank.counts, counts)
  np.testing.assert_array_equal(bank.starts, [0, 3, 8, 9])
  assert bank.starts.dtype == jnp.int32 and bank.counts.dtype == jnp.int32
  for c in range(4):  # Each class's rows: its source images, in source order.
    rows = np.asarray(bank.images[bank.starts[c] : bank.starts[c] + bank.counts[c]])
    np.testing.assert_array_equal(rows, source.images[source.labels == c])
  # A SubsetSource (and any random-access source) gives the bank of its examples.
  keep = np.array([0, 2, 3, 5, 7, 8, 10, 11, 12])
  sub = data.SubsetSource(_ListSource(source), keep)
  sub_bank = data.ClassBank.from_source(sub, 4, augment="none", allow_empty=True)
  ref = data.ClassBank.from_source(data.subset(source, keep), 4, augment="none", allow_empty=True)
  chex.assert_trees_all_equal(sub_bank, ref)
  assert jax.tree.leaves(ref)[0].shape == (9, *SHAPE)  # images, starts, counts leaves.
  assert len(jax.tree.leaves(ref)) == 3


def test_empty_class_raises_naming_it_unless_allowed():
  source = _source([2, 3, 0, 1])
  with pytest.raises(ValueError, match=r"class 2 has no example.*allow_empty=True"):
    data.ClassBank.from_source(source, 4, augment="none")
  with pytest.raises(ValueError, match=r"class 4 has no example"):
    data.ClassBank.from_source(_source([1, 1, 1, 1]), 5, augment="none")
  bank = data.ClassBank.from_source(source, 4, augment="pad4_crop_flip", allow_empty=True)
  out = jax.jit(data.sample_by_class)(bank, jnp.array([0, 2, 3, 2]), jax.random.key(0))
  np.testing.assert_array_equal(out["mask"], [1, 0, 1, 0])
  np.testing.assert_array_equal(out["label"], [0, 2, 3, 2])
  assert not np.asarray(out["image"][1]).any() and not np.asarray(out["image"][3]).any()
  assert np.asarray(out["image"][0]).any()


def test_from_source_rejects_bad_arguments():
  source = _source([2, 2])
  with pytest.raises(ValueError, match=r"label 1 .*outside \[0, num_classes=1\)"):
    data.ClassBank.from_source(source, 1, augment="none")
  with pytest.raises(ValueError, match=r"augment='rotate'.*pad4_crop_flip"):
    data.ClassBank.from_source(source, 2, augment="rotate")
  with pytest.raises(ValueError, match="empty source"):
    data.ClassBank.from_source(data.subset(source, []), 2, augment="none")


# --- Sampling ----------------------------------------------------------------------


class SampleByClassTest(chex.TestCase):
  def setUp(self):
    super().setUp()
    self.source = _source([4, 6, 3, 5, 2])

  @chex.variants(with_jit=True, without_jit=True)
  def test_labels_and_images_belong_to_the_class(self):
    bank = data.ClassBank.from_source(self.source, 5, augment="none")
    classes = jax.random.randint(jax.random.key(1), (64,), 0, 5)
    out = self.variant(data.sample_by_class)(bank, classes, jax.random.key(2))
    chex.assert_shape(out["image"], (64, *SHAPE))
    chex.assert_type(
      [out["image"], out["label"], out["mask"]], [jnp.float32, jnp.int32, jnp.float32]
    )
    np.testing.assert_array_equal(out["label"], classes)
    np.testing.assert_array_equal(out["mask"], np.ones(64))
    # Bitwise the eval pipeline's float image of a source example of that class.
    as_float = _as_float(self.source.images)
    for image, c in zip(np.asarray(out["image"]), np.asarray(classes)):
      hits = np.flatnonzero((as_float == image).all(axis=(1, 2, 3)))
      assert len(hits) == 1 and self.source.labels[hits[0]] == c

  @chex.variants(with_jit=True, without_jit=True)
  def test_augmented_draws_are_pad_crop_flips_of_class_members(self):
    bank = data.ClassBank.from_source(self.source, 5, augment="pad4_crop_flip")
    classes = jnp.arange(40) % 5
    out = self.variant(data.sample_by_class)(bank, classes, jax.random.PRNGKey(3))
    np.testing.assert_array_equal(out["label"], classes)
    # Every (member, offset, flip) of each class, as the numpy pipeline makes them.
    grid = np.stack(np.meshgrid(np.arange(9), np.arange(9), indexing="ij"), -1)
    grid = grid.reshape(-1, 2)
    unchanged = 0
    for image, c in zip(np.asarray(out["image"]), np.asarray(classes)):
      members = self.source.images[self.source.labels == c]
      n = len(members) * len(grid) * 2
      crops = data.pad_crop_flip(
        np.repeat(members, 2 * len(grid), axis=0),
        np.tile(np.repeat(grid, 2, axis=0), (len(members), 1)),
        np.tile([False, True], n // 2),
        4,
      )
      assert (_as_float(crops) == image).all(axis=(1, 2, 3)).any()
      unchanged += (_as_float(members) == image).all(axis=(1, 2, 3)).any()
    assert unchanged < 10  # Only offset (4, 4) without flip keeps an image as is.

  def test_second_call_with_new_key_does_not_retrace(self):
    bank = data.ClassBank.from_source(self.source, 5, augment="pad4_crop_flip")
    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(data.sample_by_class, n=1))
    a = step(bank, jnp.arange(8) % 5, jax.random.key(0))
    b = step(bank, jnp.arange(8)[::-1] % 5, jax.random.key(1))
    # Another bank of the same shapes (a different split or subset) reuses the trace.
    bank2 = data.ClassBank.from_source(
      _source([4, 4, 4, 4, 4], seed=1), 5, augment="pad4_crop_flip"
    )
    step(bank2, jnp.arange(8) % 5, jax.random.key(2))
    assert not np.array_equal(a["image"], b["image"])

  def test_vmap_over_keys_and_classes_equals_a_loop(self):
    bank = data.ClassBank.from_source(self.source, 5, augment="pad4_crop_flip")
    keys = jax.random.split(jax.random.key(4), 3)
    classes = jax.random.randint(jax.random.key(5), (3, 7), 0, 5)
    out = jax.jit(jax.vmap(data.sample_by_class, in_axes=(None, 0, 0)))(bank, classes, keys)
    for i in range(3):
      chex.assert_trees_all_equal(
        jax.tree.map(lambda x: x[i], out), data.sample_by_class(bank, classes[i], keys[i])
      )


def test_draws_are_uniform_within_a_class():
  source = _source([3, 5, 2])
  bank = data.ClassBank.from_source(source, 3, augment="none")
  n = 100_000
  out = jax.jit(data.sample_by_class)(bank, jnp.ones(n, jnp.int32), jax.random.key(7))
  members = source.images[source.labels == 1]
  pixels = np.asarray(out["image"]).reshape(n, -1)
  member_pixels = _as_float(members).reshape(len(members), -1)
  # Images are random: their first 8 pixels identify them.
  which = (pixels[:, None, :8] == member_pixels[None, :, :8]).all(-1)
  assert (which.sum(1) == 1).all()  # Every draw is exactly one member of class 1.
  observed = which.sum(0)
  try:
    from scipy import stats  # pylint: disable=g-import-not-at-top

    p = stats.chisquare(observed).pvalue
    assert p > 0.01, (observed, p)
  except ImportError:
    chi2 = ((observed - n / 5) ** 2 / (n / 5)).sum()
    assert chi2 < 20.0, observed  # chi2(4): P(> 20) < 1e-3.


# --- Augmentation and conversion ----------------------------------------------------


@pytest.mark.parametrize("padding", [1, 4, 8])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_augment_jax_with_equals_pad_crop_flip_bitwise(padding, dtype):
  rng = np.random.default_rng(padding)
  images = rng.integers(0, 256, (16, 9, 7, 3)).astype(dtype)
  offsets = rng.integers(0, 2 * padding + 1, (16, 2))
  flips = rng.random(16) < 0.5
  expected = data.pad_crop_flip(images, offsets, flips, padding)
  for fn in (data.augment_jax_with, jax.jit(data.augment_jax_with, static_argnums=3)):
    out = fn(jnp.asarray(images), offsets, flips, padding)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, expected)


def test_augment_jax_reproduces_the_training_pipeline_batch():
  """train_iterator draws offsets/flips with numpy; fed those, JAX gives its batch."""
  source = data.ArraySource(
    np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8), np.arange(16)
  )
  seed, batch_size = 3, 8
  stream = data.train_iterator(
    source, global_batch_size=batch_size, seed=seed, augment="pad4_crop_flip", num_threads=0
  )
  for step in range(2):
    batch = next(stream)
    rng = np.random.default_rng((seed, step))  # As train_iterator's make_batch.
    offsets = rng.integers(0, 9, (batch_size, 2))
    flips = rng.random(batch_size) < 0.5
    images = data.augment_jax_with(jnp.asarray(source.images[batch["label"]]), offsets, flips, 4)
    np.testing.assert_array_equal(data.uint8_to_float(images), batch["image"])


def test_augmentation_params_match_the_pipeline_parameterisation():
  offsets, flips = jax.jit(data.augmentation_params, static_argnums=(1, 2))(
    jax.random.key(0), 4000, "pad4_crop_flip"
  )
  assert offsets.shape == (4000, 2) and flips.shape == (4000,) and flips.dtype == bool
  assert set(np.unique(offsets)) == set(range(9))  # [0, 2 * padding], both axes.
  assert set(np.unique(offsets[:, 1])) == set(range(9))
  assert abs(float(flips.mean()) - 0.5) < 0.05
  assert (
    np.unique(data.augmentation_params(jax.random.key(0), 4000, "pad8_crop_flip")[0]).max() == 16
  )
  assert data.augmentation_params(jax.random.key(0), 4, "none") is None
  images = jnp.arange(2 * 4 * 4, dtype=jnp.uint8).reshape(2, 4, 4, 1)
  assert data.augment_jax(images, jax.random.key(0), "none") is images
  with pytest.raises(ValueError, match="kind='rotate'"):
    data.augment_jax(images, jax.random.key(0), "rotate")


def test_uint8_to_float_equals_the_pipeline_conversion():
  values = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
  expected = _as_float(values)
  np.testing.assert_array_equal(data.uint8_to_float(jnp.asarray(values)), expected)
  np.testing.assert_array_equal(jax.jit(data.uint8_to_float)(values), expected)
  np.testing.assert_array_equal(expected, values.astype(np.float32) / np.float32(255))
  with pytest.raises(ValueError, match="must be uint8"):
    data.uint8_to_float(jnp.zeros((1, 2, 2, 1), jnp.float32))


def test_bank_can_be_replicated_over_a_mesh():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  bank = data.ClassBank.from_source(
    _source([3, 3]), 2, augment="pad4_crop_flip", sharding=replicated
  )
  assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(bank))
  classes = jax.device_put(
    jnp.arange(8) % 2, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  )
  out = jax.jit(data.sample_by_class)(bank, classes, jax.random.key(0))
  np.testing.assert_array_equal(out["label"], np.arange(8) % 2)
