"""Tests for agad.data: IDX reading, dataset loaders, the grain pipeline, sharding."""

import gzip
import os
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from agad import data

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def _idx_bytes(array: np.ndarray) -> bytes:
  code = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}[array.dtype.type]
  header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">u4").tobytes()
  return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_idx(path, array, gz=True):
  payload = _idx_bytes(array)
  with open(path, "wb") as f:
    f.write(gzip.compress(payload) if gz else payload)


def _config(**fields):
  return ml_collections.ConfigDict(
    {
      "name": "synthetic",
      "data_dir": None,
      "val_size": 0,
      "val_seed": 0,
      "max_train": None,
      "max_test": None,
      **fields,
    }
  )


def _id_source(n, shape=(4, 4, 1)):
  """Examples whose label is their index, to follow them through the pipeline."""
  images = np.random.default_rng(0).integers(0, 256, (n, *shape), dtype=np.uint8)
  return data.ArraySource(images, np.arange(n))


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_stream(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


# --- IDX and loaders --------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_read_idx_round_trip(tmp_path, gz, dtype):
  array = (np.arange(24).reshape(2, 3, 4) * 3).astype(dtype)
  _write_idx(tmp_path / "x", array, gz)
  out = data.read_idx(tmp_path / "x")
  assert out.dtype == dtype and out.shape == (2, 3, 4)
  np.testing.assert_array_equal(out, array)


def test_read_idx_rejects_bad_files(tmp_path):
  (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + bytes(8))
  with pytest.raises(ValueError, match="not an IDX file"):
    data.read_idx(tmp_path / "bad")
  (tmp_path / "short").write_bytes(_idx_bytes(np.zeros((4, 2), np.uint8))[:-1])
  with pytest.raises(ValueError, match="truncated"):
    data.read_idx(tmp_path / "short")


@pytest.fixture
def fake_fashion_dir(tmp_path):
  rng = np.random.default_rng(0)
  for prefix, n in (("train", 20), ("t10k", 6)):
    _write_idx(
      tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    )
    _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8) % 10)
  return tmp_path


def test_fashion_mnist_loader_and_val_carve(fake_fashion_dir):
  cfg = _config(name="fashion_mnist", data_dir=str(fake_fashion_dir), val_size=5)
  splits = data.load_dataset(cfg)
  assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 5, 6)
  assert splits.info.image_shape == (28, 28, 1) and splits.info.num_classes == 10
  example = splits.test[3]
  assert example["image"].shape == (28, 28, 1) and example["image"].dtype == np.uint8
  assert example["label"] == 3 and isinstance(example["label"], int)
  raw = data.read_idx(fake_fashion_dir / "train-images-idx3-ubyte.gz")

  def original_ids(source):  # Images are random, so they identify examples.
    return {
      int(np.flatnonzero((raw == source[i]["image"][..., 0]).all((1, 2)))[0])
      for i in range(len(source))
    }

  train_ids, val_ids = original_ids(splits.train), original_ids(splits.val)
  assert not train_ids & val_ids and train_ids | val_ids == set(range(20))
  assert original_ids(data.load_dataset(cfg).val) == val_ids  # Deterministic.
  cfg.val_seed = 1
  assert original_ids(data.load_dataset(cfg).val) != val_ids
  cfg.update(max_train=4, max_test=2)
  small = data.load_dataset(cfg)
  assert (len(small.train), len(small.test)) == (4, 2)
  assert original_ids(small.train) == set(
    sorted(
      original_ids(
        data.load_dataset(
          _config(name="fashion_mnist", data_dir=str(fake_fashion_dir), val_size=5, val_seed=1)
        ).train
      )
    )[:4]
  )


def test_missing_data_errors_name_dir_and_fix(tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(
    data.DataNotFoundError, match=r"(?s)nowhere.*apt-get install -y dataset-fashion-mnist"
  ):
    data.load_dataset(_config(name="fashion_mnist", data_dir=missing))
  with pytest.raises(
    data.DataNotFoundError, match=r"(?s)nowhere.*python -m launch.prepare_data --dataset=cifar100"
  ):
    data.load_dataset(_config(name="cifar100", data_dir=missing))
  with pytest.raises(data.DataNotFoundError, match=r"(?s)nowhere.*tiny-imagenet-200.zip"):
    data.load_dataset(_config(name="tiny_imagenet", data_dir=missing))
  with pytest.raises(ValueError, match="valid names.*fashion_mnist"):
    data.load_dataset(_config(name="mnist"))
  with pytest.raises(ValueError, match="val_size=300"):
    data.load_dataset(_config(num_train=100, val_size=300))


def test_tfds_cifar10_mock_through_pipeline():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=12):
    splits = data.load_dataset(_config(name="cifar10", val_size=4))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 4, 12)
    example = splits.train[0]
    assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8
    assert 0 <= example["label"] < 10 and splits.info.augment == "pad4_crop_flip"
    batch = next(
      data.train_iterator(
        splits.train, global_batch_size=4, seed=0, augment=splits.info.augment, num_threads=0
      )
    )
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
    evals = data.eval_batches(splits.test, batch_size=8, multiple_of=4)
    assert [b["mask"].sum() for b in evals] == [8, 4] and evals.num_examples == 12


def test_tiny_imagenet_layout(tmp_path):
  image_module = pytest.importorskip("PIL.Image")
  root = tmp_path / "tiny-imagenet-200"
  wnids = ["n02", "n01"]  # Unsorted in the file; labels follow sorted order.
  rng = np.random.default_rng(0)

  def jpeg(path, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, (64, 64, 3) if mode == "RGB" else (64, 64), np.uint8)
    image_module.fromarray(pixels, mode).save(path)

  (root / "val" / "images").mkdir(parents=True)
  (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
  for wnid in wnids:
    for i in range(2):
      jpeg(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", "L" if i else "RGB")
  jpeg(root / "val" / "images" / "val_0.JPEG")
  jpeg(root / "val" / "images" / "val_1.JPEG", "L")
  (root / "val" / "val_annotations.txt").write_text(
    "val_0.JPEG\tn02\t0\t0\t63\t63\nval_1.JPEG\tn01\t0\t0\t63\t63\n"
  )
  splits = data.load_dataset(_config(name="tiny_imagenet", data_dir=str(tmp_path)))
  assert [splits.train[i]["label"] for i in range(4)] == [0, 0, 1, 1]
  assert [splits.test[i]["label"] for i in range(2)] == [1, 0]
  assert all(splits.train[i]["image"].shape == (64, 64, 3) for i in range(4))
  assert splits.test[1]["image"].dtype == np.uint8 and splits.info.num_classes == 200


@pytest.mark.skipif(
  not os.path.exists(f"{FASHION_DIR}/train-images-idx3-ubyte.gz"),
  reason=f"dataset-fashion-mnist (Debian) not in {FASHION_DIR}",
)
def test_real_fashion_mnist_smoke():
  splits = data.load_dataset(_config(name="fashion_mnist", val_size=5000))
  assert (len(splits.train), len(splits.val), len(splits.test)) == (55000, 5000, 10000)
  assert np.bincount(splits.test.labels).tolist() == [1000] * 10
  assert splits.train.images.shape[1:] == (28, 28, 1)
  mean = splits.train.images.mean() / 255
  assert abs(mean - splits.info.mean[0]) < 0.01


# --- training pipeline ------------------------------------------------------------


def test_train_batches_shape_dtype_range():
  splits = data.load_dataset(_config(num_train=40, image_shape=(6, 6, 3), num_classes=5))
  batch = next(data.train_iterator(splits.train, global_batch_size=8, seed=0))
  assert batch["image"].shape == (8, 6, 6, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
  assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert set(batch["label"]) <= set(range(5))
  assert data.steps_per_epoch(40, 8) == 5 and data.steps_per_epoch(41, 8) == 5
  with pytest.raises(ValueError, match="global_batch_size=64"):
    data.steps_per_epoch(40, 64)


def test_epochs_are_fresh_permutations_and_seeded():
  source = _id_source(24)
  stream = _take(data.train_iterator(source, global_batch_size=6, seed=3), 12)
  epochs = [np.concatenate([b["label"] for b in stream[i : i + 4]]) for i in (0, 4, 8)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(24))
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])
  # Images follow their labels.
  np.testing.assert_array_equal(
    stream[0]["image"], source.images[stream[0]["label"]] / np.float32(255)
  )
  _assert_same_stream(
    stream, _take(data.train_iterator(source, global_batch_size=6, seed=3, num_threads=0), 12)
  )
  other = _take(data.train_iterator(source, global_batch_size=6, seed=4), 4)
  assert not np.array_equal(np.concatenate([b["label"] for b in other]), epochs[0])


def test_pad_crop_flip_exact():
  image = np.arange(1, 10, dtype=np.uint8).reshape(1, 3, 3, 1)
  crop = lambda offset, flip: data.pad_crop_flip(image, np.array([offset]), np.array([flip]), 1)[
    0, ..., 0
  ]
  np.testing.assert_array_equal(crop((1, 1), False), image[0, ..., 0])
  np.testing.assert_array_equal(crop((1, 1), True), image[0, :, ::-1, 0])
  np.testing.assert_array_equal(crop((0, 2), False), [[0, 0, 0], [2, 3, 0], [5, 6, 0]])


def test_augmentation_is_seeded_and_changes_images():
  source = _id_source(16, shape=(32, 32, 3))
  make = lambda seed: data.train_iterator(
    source, global_batch_size=8, seed=seed, augment="pad4_crop_flip"
  )
  stream = _take(make(0), 4)
  _assert_same_stream(stream, _take(make(0), 4))
  assert stream[0]["image"].shape == (8, 32, 32, 3)
  clean = [source.images[b["label"]] / np.float32(255) for b in stream]
  changed = np.mean(
    [not np.array_equal(c[i], b["image"][i]) for c, b in zip(clean, stream) for i in range(8)]
  )
  assert changed > 0.8  # Only offset (4, 4) without flip leaves an image unchanged.
  with pytest.raises(ValueError, match="augment='rotate'"):
    data.train_iterator(source, global_batch_size=8, seed=0, augment="rotate")


def test_get_state_set_state_resumes_exactly():
  source = _id_source(20, shape=(8, 8, 3))
  make = lambda: data.train_iterator(source, global_batch_size=6, seed=1, augment="pad4_crop_flip")
  reference = _take(make(), 9)
  interrupted = make()
  _take(interrupted, 5)
  state = interrupted.get_state()
  resumed = make()
  resumed.set_state(state)
  _assert_same_stream(_take(resumed, 4), reference[5:])  # Crosses epoch boundaries.


def test_hosts_read_contiguous_halves_of_the_global_batch():
  # Host p holds rows [4p, 4p+4) of each global batch of 8, augmented as in one process:
  # the hosts' rows concatenated in process order are the one-process batches, in order
  # (the global array of shard_batch), and every host's iterator state is the same.
  source = _id_source(24, shape=(8, 8, 1))
  make = lambda **kw: data.train_iterator(
    source, global_batch_size=8, seed=0, augment="pad4_crop_flip", num_threads=0, **kw
  )
  whole = _take(make(), 4)  # crosses an epoch boundary (3 batches per epoch)
  hosts = [make(process_index=p, process_count=2) for p in (0, 1)]
  parts = [_take(it, 4) for it in hosts]
  for k in range(4):
    for key in ("image", "label"):
      np.testing.assert_array_equal(
        np.concatenate([parts[0][k][key], parts[1][k][key]]), whole[k][key]
      )
  assert parts[0][0]["label"].shape == (4,)
  assert hosts[0].get_state() == hosts[1].get_state()
  with pytest.raises(ValueError, match="global_batch_size=9.*process_count=2"):
    data.train_iterator(source, global_batch_size=9, seed=0, process_count=2)


# --- evaluation, sharding, prefetch -----------------------------------------------


def test_eval_batches_pad_and_mask():
  source = _id_source(10)
  evals = data.eval_batches(source, batch_size=4, multiple_of=2)
  batches = list(evals)
  assert evals.num_examples == 10 and len(evals) == 3
  assert [b["label"].shape[0] for b in batches] == [4, 4, 2]
  assert batches[0]["mask"].dtype == np.float32
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), range(10))
  batches = list(data.eval_batches(source, batch_size=4, multiple_of=4))
  np.testing.assert_array_equal(batches[-1]["mask"], [1, 1, 0, 0])
  np.testing.assert_array_equal(batches[-1]["image"][2:], 0)
  full = list(data.eval_batches(source, batch_size=4, multiple_of=2, full_batches=True))
  assert full[-1]["mask"].tolist() == [1, 1, 0, 0]
  subset = data.eval_batches(source, batch_size=4, indices=[7, 3, 5])
  assert subset.num_examples == 3
  assert [b["label"].tolist() for b in subset] == [[7, 3, 5]]
  # Two hosts: contiguous halves of each global batch, padding at the end of each.
  hosts = [
    list(data.eval_batches(source, batch_size=4, multiple_of=4, process_index=p, process_count=2))
    for p in (0, 1)
  ]
  assert [b["label"].tolist() for b in hosts[0]] == [[0, 1], [4, 5], [8, 9]]
  assert [b["mask"].tolist() for b in hosts[1]] == [[1, 1], [1, 1], [0, 0]]
  lazy = type(
    "Lazy",
    (),
    {
      "__len__": lambda self: 10,  # Generic per-example path.
      "__getitem__": lambda self, i: source[i],
    },
  )()
  last = list(
    data.eval_batches(lazy, batch_size=4, multiple_of=4, process_index=1, process_count=2)
  )[-1]
  assert last["image"].shape == (2, 4, 4, 1) and last["mask"].tolist() == [0, 0]
  with pytest.raises(ValueError, match="batch_size=6 must be a multiple of multiple_of=4"):
    data.eval_batches(source, batch_size=6, multiple_of=4)


def _data_sharding():
  mesh = jax.sharding.Mesh(
    np.array(jax.devices()), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
  )
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def test_shard_batch_builds_global_arrays():
  sharding = _data_sharding()
  n = 2 * jax.device_count()
  batch = next(iter(data.eval_batches(_id_source(n), batch_size=n)))
  sharded = data.shard_batch(batch, sharding)
  for key in batch:
    assert isinstance(sharded[key], jax.Array) and sharded[key].shape == batch[key].shape
    assert sharded[key].sharding.is_equivalent_to(sharding, batch[key].ndim)
    assert len(sharded[key].addressable_shards) == jax.device_count()
    np.testing.assert_array_equal(np.asarray(sharded[key]), batch[key])


def test_prefetch_to_device_keeps_exact_state():
  sharding = _data_sharding()
  source = _id_source(20)
  batch_size = 2 * jax.device_count()
  make = lambda: data.train_iterator(
    source, global_batch_size=batch_size, seed=2, augment="pad4_crop_flip"
  )
  reference = _take(make(), 7)
  prefetcher = data.prefetch_to_device(make(), 3, sharding)
  first = _take(prefetcher, 3)
  assert isinstance(first[0]["image"], jax.Array)
  _assert_same_stream([jax.tree.map(np.asarray, b) for b in first], reference[:3])
  deadline = time.time() + 10
  while not prefetcher._queue.full() and time.time() < deadline:  # Let it run ahead.
    time.sleep(0.01)
  assert prefetcher._queue.full()
  state = prefetcher.get_state()  # The thread has run ahead; the state must not.
  resumed = make()
  resumed.set_state(state)
  _assert_same_stream(_take(resumed, 4), reference[3:])
  prefetcher.set_state(state)
  _assert_same_stream([jax.tree.map(np.asarray, b) for b in _take(prefetcher, 4)], reference[3:])
  prefetcher.close()


def test_prefetch_to_device_propagates_errors():

  class Failing:
    def __init__(self):
      self.count = 0

    def __iter__(self):
      return self

    def __next__(self):
      self.count += 1
      if self.count > 2:
        raise RuntimeError("disk on fire")
      return {"x": np.zeros((jax.device_count(),), np.float32)}

    def get_state(self):
      return {"count": self.count}

  prefetcher = data.prefetch_to_device(Failing(), 2, _data_sharding())
  _take(prefetcher, 2)
  assert prefetcher.get_state() == {"count": 2}
  with pytest.raises(RuntimeError, match="disk on fire"):
    next(prefetcher)


def test_prepare_data_without_tensorflow_says_what_is_needed():
  try:
    import tensorflow  # noqa: F401 (only whether it imports matters)

    pytest.skip("TensorFlow is installed; this checks the TF-free message.")
  except ImportError:
    pass
  result = subprocess.run(
    [sys.executable, "-m", "launch.prepare_data", "--dataset=cifar10", "--data_dir=/nonexistent"],
    capture_output=True,
    text=True,
    timeout=60,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  assert result.returncode != 0
  assert "pip install -e .[prepare]" in result.stderr and "internet" in result.stderr
