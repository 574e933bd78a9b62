"""Datasets (`load_dataset`) and the grain input pipeline for agad."""

from agad.data.idx import read_idx
from agad.data.pipeline import (AUGMENTATIONS, DevicePrefetcher, EvalBatches,
                                eval_batches, pad_crop_flip, prefetch_to_device,
                                read_batch, shard_batch, steps_per_epoch, train_iterator)
from agad.data.sources import (DATASET_NAMES, ArraySource, DataNotFoundError,
                               DatasetInfo, DatasetSplits, SubsetSource, TfdsSource, dataset_info,
                               TinyImageNetSource, load_dataset, subset)
