r"""Downloads a TFDS dataset once and writes it as ArrayRecord for `agad.data`.

  python -m launch.prepare_data --dataset=cifar10 --data_dir=DIR

Training reads the result with `tfds.data_source` and needs no TensorFlow, but TFDS's
downloader and builders do: run this on a machine with internet after
`pip install -e .[prepare]` (installs tensorflow-cpu), then point
config.data.data_dir at DIR (copy DIR to the training machines if needed).
Fashion-MNIST needs no preparation (`apt-get install -y dataset-fashion-mnist`);
for Tiny ImageNet this prints the manual steps.
"""

import importlib.util
import sys

from absl import app
from absl import flags

_DATASET = flags.DEFINE_enum(
  "dataset", None, ["cifar10", "cifar100", "svhn_cropped", "tiny_imagenet"], "Dataset to prepare."
)
_DATA_DIR = flags.DEFINE_string(
  "data_dir", None, "Output folder (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)."
)
flags.mark_flag_as_required("dataset")

_TINY_IMAGENET_STEPS = """\
Tiny ImageNet is not in the TFDS catalog; prepare it by hand (needs internet, 237 MB):
  wget http://cs231n.stanford.edu/tiny-imagenet-200.zip
  unzip -q tiny-imagenet-200.zip -d {dir}
This gives {dir}/tiny-imagenet-200/{{wnids.txt, train/<wnid>/images/*.JPEG,
val/images/*.JPEG, val/val_annotations.txt}}; then set config.data.data_dir={dir}.
(The official val split, which has labels, serves as the test split.)"""


def tensorflow_installed() -> bool:
  """TFDS's builders download and encode with TensorFlow (looked up, not imported: slow)."""
  return importlib.util.find_spec("tensorflow") is not None


def main(argv):
  del argv
  name, data_dir = _DATASET.value, _DATA_DIR.value
  if name == "tiny_imagenet":
    print(_TINY_IMAGENET_STEPS.format(dir=data_dir or "DIR"))
    return 0
  if not tensorflow_installed():
    sys.exit(
      f"Preparing {name} needs TensorFlow (TFDS downloads and encodes with it), "
      "which agad does not install by default. Fix: `pip install -e .[prepare]` "
      "(adds tensorflow-cpu), on a machine with internet, then rerun this "
      "command."
    )
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  where = data_dir or "$TFDS_DATA_DIR or ~/tensorflow_datasets"
  try:
    tfds.builder(name, data_dir=data_dir).download_and_prepare(file_format="array_record")
  except Exception as e:  # pylint: disable=broad-except  (network errors vary by layer)
    sys.exit(
      f"Preparing {name} in {where} failed: {type(e).__name__}: {e}\n"
      "This step needs internet access to the dataset host and TensorFlow "
      "(`pip install -e .[prepare]`). Check the connection or proxy "
      "(HTTPS_PROXY) and rerun, or prepare on another machine and copy the "
      "folder over."
    )
  sizes = {
    split: len(tfds.data_source(name, split=split, data_dir=data_dir, download=False))
    for split in ("train", "test")
  }
  print(
    f"Prepared {name} in {where}: {sizes} examples. "
    f"Use config.data.data_dir={data_dir or 'None (the tfds default)'}."
  )
  return 0


if __name__ == "__main__":
  app.run(main)
