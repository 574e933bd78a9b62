"""Random-access data sources and `load_dataset`, the one entry point from a config.

Every split is a grain-compatible random-access source: `len(source)` and
`source[i] -> {'image': uint8 [H, W, C], 'label': int}`. Images stay uint8 here; the
pipeline converts them to float32 in [0, 1]; the model scales them as `config.model.input_norm`
says (`dataset`: by `info.mean/std`).
"""

import dataclasses
import os
from typing import Any, Protocol, Sequence

import numpy as np

from agad.data.idx import read_idx

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
TFDS_NAMES = ("cifar10", "cifar100", "svhn_cropped")
DATASET_NAMES = ("fashion_mnist", *TFDS_NAMES, "tiny_imagenet", "synthetic")


class DataNotFoundError(FileNotFoundError):
  """A dataset is not on disk; the message says how to get it."""


class RandomAccessSource(Protocol):
  """What grain's `MapDataset.source` and our pipeline need from a split."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a dataset.

  Attributes:
    name: dataset name as in the config.
    num_classes: number of labels.
    image_shape: (H, W, C) of every image.
    mean, std: per-channel statistics in [0, 1] pixel units (length C), for the
      model's input normalisation.
    augment: name of the training augmentation (see `pipeline.AUGMENTATIONS`).
  """

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  augment: str


@dataclasses.dataclass(frozen=True)
class DatasetSplits:
  """train (after the val carve), val (carved from train; may be empty), test, info."""

  train: RandomAccessSource
  val: RandomAccessSource
  test: RandomAccessSource
  info: DatasetInfo


# Standard per-channel statistics of the training sets (the usual torchvision values),
# used by ``model.input_norm = "dataset"``. Most of the papers' reference code does not
# normalise by them: FSR, AGAIN, TRADES and MART feed raw [0, 1] pixels, ATAT standardises
# each image and AGKD-BML maps to [-1, 1]; each dataset config sets its recipes' scaling.
# Augmentation follows the reference code's torchvision transforms.
_INFOS = {
  "fashion_mnist": DatasetInfo("fashion_mnist", 10, (28, 28, 1), (0.2860,), (0.3530,), "none"),
  "cifar10": DatasetInfo(
    "cifar10", 10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), "pad4_crop_flip"
  ),
  "cifar100": DatasetInfo(
    "cifar100",
    100,
    (32, 32, 3),
    (0.5071, 0.4865, 0.4409),
    (0.2673, 0.2564, 0.2762),
    "pad4_crop_flip",
  ),
  # Digits: flipping changes their meaning, and the SVHN AT literature uses none.
  "svhn_cropped": DatasetInfo(
    "svhn_cropped", 10, (32, 32, 3), (0.4377, 0.4438, 0.4728), (0.198, 0.201, 0.197), "none"
  ),
  # 8-pixel padding at 64x64 is the same relative shift as 4 pixels at 32x32.
  "tiny_imagenet": DatasetInfo(
    "tiny_imagenet",
    200,
    (64, 64, 3),
    (0.4802, 0.4481, 0.3975),
    (0.2302, 0.2265, 0.2262),
    "pad8_crop_flip",
  ),
}


class ArraySource:
  """In-memory split: images uint8 [N, H, W, C], labels int [N]."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if images.ndim != 4 or images.dtype != np.uint8:
      raise ValueError(
        f"images must be uint8 [N, H, W, C], got {images.dtype} "
        f"{images.shape}; add a channel axis with images[..., None]."
      )
    if labels.shape != images.shape[:1]:
      raise ValueError(
        f"labels shape {labels.shape} must be [{images.shape[0]}] to match images {images.shape}."
      )
    self.images, self.labels = images, labels.astype(np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": int(self.labels[index])}


class SubsetSource:
  """The examples `parent[indices[i]]`, without copying data."""

  def __init__(self, parent: RandomAccessSource, indices: Sequence[int]):
    self.parent, self.indices = parent, np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.parent[int(self.indices[index])]


def subset(source: RandomAccessSource, indices: Sequence[int]) -> RandomAccessSource:
  """`source` restricted to `indices`; array sources stay contiguous arrays (fast)."""
  if isinstance(source, ArraySource):
    return ArraySource(source.images[indices], source.labels[indices])
  return SubsetSource(source, indices)


class TfdsSource:
  """Adapts a `tfds.data_source` split to {'image', 'label': int}.

  Reads one example at a time: the mocked source of `tfds.testing.mock_data` raises
  TypeError on batched `__getitems__`, and grain falls back to `__getitem__` anyway.
  """

  def __init__(self, tfds_source):
    self.tfds_source = tfds_source

  def __len__(self) -> int:
    return len(self.tfds_source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self.tfds_source[index]
    return {"image": np.asarray(example["image"], np.uint8), "label": int(example["label"])}


def _load_fashion_mnist(data_dir: str | None):
  data_dir = data_dir or DEFAULT_FASHION_MNIST_DIR
  splits = []
  for prefix in ("train", "t10k"):
    arrays = []
    for kind in ("images-idx3", "labels-idx1"):
      path = os.path.join(data_dir, f"{prefix}-{kind}-ubyte.gz")
      if not os.path.exists(path):
        path = path[:-3]  # Also accept the uncompressed files.
      if not os.path.exists(path):
        raise DataNotFoundError(
          f"Fashion-MNIST file {os.path.basename(path)}[.gz] not found in "
          f"data_dir={data_dir!r}. Fix: `apt-get update && apt-get install -y "
          f"dataset-fashion-mnist` (installs to {DEFAULT_FASHION_MNIST_DIR}), or set "
          "config.data.data_dir to a folder holding {train,t10k}-{images-idx3,"
          "labels-idx1}-ubyte[.gz]."
        )
      arrays.append(read_idx(path))
    splits.append(ArraySource(arrays[0][..., None], arrays[1]))
  return splits


_UNPREPARED_HINTS = (
  "not found",
  "no such file",
  "does not exist",
  "not prepared",
  "notfound",
  "no builder",
  "could not find",
  "missing",
)


def _looks_unprepared(error: Exception) -> bool:
  """Whether a tfds exception means "this dataset is not prepared here"."""
  if isinstance(error, (FileNotFoundError, ModuleNotFoundError)):
    return True
  text = f"{type(error).__name__} {error}".lower()
  return any(hint in text for hint in _UNPREPARED_HINTS)


def _load_tfds(name: str, data_dir: str | None):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  splits = []
  for split in ("train", "test"):
    try:
      # download=False: without it a missing dataset starts a download that fails
      # without TensorFlow, hiding the real problem.
      splits.append(
        TfdsSource(tfds.data_source(name, split=split, data_dir=data_dir, download=False))
      )
    except Exception as e:  # tfds raises several unrelated types for "not prepared".
      if not _looks_unprepared(e):
        raise  # A real error (permissions, a corrupt file, a tfds bug): not relabelled.
      where = data_dir or "$TFDS_DATA_DIR or ~/tensorflow_datasets (tfds default)"
      raise DataNotFoundError(
        f"dataset {name!r} split {split!r} is not prepared as ArrayRecord in "
        f"data_dir={where}. Fix, once, on a machine with internet: `pip install -e "
        f".[prepare]` (adds tensorflow-cpu) then `python -m launch.prepare_data "
        f"--dataset={name} --data_dir=DIR`, and set config.data.data_dir=DIR. "
        f"(tfds said: {type(e).__name__}: {str(e)[:200]})"
      ) from e
  return splits


class TinyImageNetSource:
  """Tiny ImageNet JPEGs decoded lazily: images uint8 [64, 64, 3]."""

  def __init__(self, paths: Sequence[str], labels: Sequence[int]):
    self.paths, self.labels = list(paths), np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict[str, Any]:
    from PIL import Image  # pylint: disable=g-import-not-at-top

    with Image.open(self.paths[index]) as image:
      # About 2% of the files are grayscale.
      pixels = np.asarray(image.convert("RGB"), np.uint8)
    return {"image": pixels, "label": int(self.labels[index])}


def _default_tfds_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def _load_tiny_imagenet(data_dir: str | None):
  """Train from train/<wnid>/images; test = the labelled official val split."""
  data_dir = data_dir or _default_tfds_dir()
  root = (
    data_dir
    if os.path.exists(os.path.join(data_dir, "wnids.txt"))
    else (os.path.join(data_dir, "tiny-imagenet-200"))
  )
  annotations = os.path.join(root, "val", "val_annotations.txt")
  if not (os.path.exists(os.path.join(root, "wnids.txt")) and os.path.exists(annotations)):
    raise DataNotFoundError(
      f"Tiny ImageNet not found in data_dir={data_dir!r} (looked for "
      f"{root}/wnids.txt and {annotations}). Fix: download "
      "http://cs231n.stanford.edu/tiny-imagenet-200.zip, `unzip tiny-imagenet-200.zip "
      "-d DIR`, and set config.data.data_dir=DIR (see python -m launch.prepare_data "
      "--dataset=tiny_imagenet)."
    )
  with open(os.path.join(root, "wnids.txt")) as f:
    # Sorted, as torchvision's ImageFolder numbers classes in the reference code.
    wnids = sorted(line.strip() for line in f if line.strip())
  label_of = {wnid: i for i, wnid in enumerate(wnids)}
  train_paths, train_labels = [], []
  for wnid in wnids:
    folder = os.path.join(root, "train", wnid, "images")
    if not os.path.isdir(folder):
      raise DataNotFoundError(
        f"{folder} is missing although {wnid} is in wnids.txt: "
        "the archive is incomplete; unzip it again."
      )
    names = sorted(n for n in os.listdir(folder) if n.endswith(".JPEG"))
    train_paths += [os.path.join(folder, n) for n in names]
    train_labels += [label_of[wnid]] * len(names)
  with open(annotations) as f:
    rows = sorted(line.split("\t")[:2] for line in f if line.strip())
  test = TinyImageNetSource(
    [os.path.join(root, "val", "images", n) for n, _ in rows], [label_of[w] for _, w in rows]
  )
  return TinyImageNetSource(train_paths, train_labels), test


def _load_synthetic(cfg):
  """Noisy per-class templates, so that a tiny model can learn something in a test."""
  shape = tuple(getattr(cfg, "image_shape", (8, 8, 3)))
  num_classes = getattr(cfg, "num_classes", 10)
  rng = np.random.default_rng(getattr(cfg, "seed", 0))
  templates = rng.uniform(0, 255, (num_classes, *shape))

  def make(n):
    labels = rng.integers(0, num_classes, n)
    images = 0.5 * templates[labels] + 0.5 * rng.uniform(0, 255, (n, *shape))
    return ArraySource(images.astype(np.uint8), labels)

  # Half template, half uniform noise: pixel mean 0.5, std about 0.2.
  info = DatasetInfo(
    "synthetic", num_classes, shape, (0.5,) * shape[-1], (0.2,) * shape[-1], "none"
  )
  return make(getattr(cfg, "num_train", 256)), make(getattr(cfg, "num_test", 64)), info


def load_dataset(cfg) -> DatasetSplits:
  """Loads the dataset a config names; see the module docstring for the split format.

  Args:
    cfg: ConfigDict or attribute object: `name` (one of DATASET_NAMES), `data_dir`
      (None: the dataset's default place), `val_size` (examples carved from train by
      a permutation seeded with `val_seed`, independent of the training seed),
      `max_train`/`max_test` (None, or keep only the first N examples of the carved
      train / of test), `augment` (optional; None keeps the dataset's default). For
      `synthetic`: `num_train`, `num_test`, `image_shape`, `num_classes`, `seed`.

  Returns:
    DatasetSplits(train, val, test, info).
  """
  name, data_dir = cfg.name, getattr(cfg, "data_dir", None)
  if name == "synthetic":
    train, test, info = _load_synthetic(cfg)
  elif name == "fashion_mnist":
    (train, test), info = _load_fashion_mnist(data_dir), _INFOS[name]
  elif name in TFDS_NAMES:
    (train, test), info = _load_tfds(name, data_dir), _INFOS[name]
  elif name == "tiny_imagenet":
    (train, test), info = _load_tiny_imagenet(data_dir), _INFOS[name]
  else:
    raise ValueError(f"unknown dataset name {name!r}; valid names: {DATASET_NAMES}.")
  if getattr(cfg, "augment", None):
    info = dataclasses.replace(info, augment=cfg.augment)

  val_size = getattr(cfg, "val_size", 0) or 0
  if not 0 <= val_size < len(train):
    raise ValueError(
      f"val_size={val_size} must be in [0, {len(train)}) for {name} "
      f"(train has {len(train)} examples); lower config.data.val_size."
    )
  permutation = np.random.default_rng(getattr(cfg, "val_seed", 0)).permutation(len(train))
  # Sorted, so that max_train keeps the first examples in the original order.
  val = subset(train, np.sort(permutation[:val_size]))
  train = subset(train, np.sort(permutation[val_size:]))
  max_train, max_test = getattr(cfg, "max_train", None), getattr(cfg, "max_test", None)
  if max_train is not None and max_train < len(train):
    train = subset(train, np.arange(max_train))
  if max_test is not None and max_test < len(test):
    test = subset(test, np.arange(max_test))
  return DatasetSplits(train, val, test, info)


def dataset_info(cfg) -> DatasetInfo:
  """Static facts of a configured dataset without reading any data (benchmarks)."""
  if cfg.name == "synthetic":
    shape = tuple(cfg.image_shape)
    return DatasetInfo(
      "synthetic", int(cfg.num_classes), shape, (0.5,) * shape[-1], (0.2,) * shape[-1], "none"
    )
  if cfg.name not in _INFOS:
    raise ValueError(f"unknown dataset name {cfg.name!r}; valid names: {DATASET_NAMES}.")
  return _INFOS[cfg.name]
