"""Datasets (`load_dataset`) and the grain input pipeline for agad."""

from agad.data.class_bank import (
  ClassBank,
  augment_jax,
  augment_jax_with,
  augmentation_params,
  sample_by_class,
  uint8_to_float,
)
from agad.data.idx import read_idx
from agad.data.pipeline import (
  AUGMENTATIONS,
  DevicePrefetcher,
  EvalBatches,
  eval_batches,
  pad_crop_flip,
  prefetch_to_device,
  read_batch,
  shard_batch,
  steps_per_epoch,
  to_host,
  train_iterator,
)
from agad.data.sources import (
  DATASET_NAMES,
  ArraySource,
  DataNotFoundError,
  DatasetInfo,
  DatasetSplits,
  SubsetSource,
  TfdsSource,
  dataset_info,
  TinyImageNetSource,
  load_dataset,
  subset,
)
