"""Import a PyTorch checkpoint as an agad workdir.

  python -m launch.import_torch --arch=ARCH --checkpoint=FILE --workdir=DIR
      [--dataset=cifar10] [--input_norm=auto]

Writes what ``launch.train`` writes (``config.json``, ``run_record.json``, an Orbax
checkpoint at step 0 holding the weights and BatchNorm running statistics), so that
``launch.evaluate``, ``launch.attention``, ``agad.load`` and ``--config.init.workdir`` take
DIR unchanged (launch/torch_workdir.py). ARCH and the PyTorch key names:
agad/interop/torch_checkpoint.py and docs/pytorch.md.
"""

from __future__ import annotations

import json

from absl import app, flags, logging

from launch import common, torch_workdir

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "arch",
  None,
  "Architecture (agad model name): smallcnn | resnet18 | resnet34 | "
  "resnet50 | preact_resnet18 | wrn16_8 | wrn28_10 | wrn34_10.",
)
flags.DEFINE_string(
  "checkpoint", None, "PyTorch checkpoint: .safetensors, or .pt/.pth with torch installed."
)
flags.DEFINE_string("workdir", None, "New agad workdir to write (must not hold checkpoints).")
flags.DEFINE_enum(
  "dataset",
  None,
  torch_workdir.DATASETS,
  "Dataset config (configs/<dataset>.py); default: fashion_mnist for smallcnn, cifar10 otherwise.",
)
flags.DEFINE_string(
  "input_norm",
  "auto",
  "What the network expects of [0, 1] pixels: auto (the "
  "checkpoint's mu/sigma buffers if it has them, else none) | none | checkpoint | "
  "a dataset name (its mean/std) | imagenet | MEAN,../STD,.. (per channel).",
)
flags.mark_flags_as_required(["arch", "checkpoint", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.init_runtime()
  with common.refuse_bad_input():  # a bad file, key or shape: one line, nothing written
    config, state, provenance = torch_workdir.prepare(
      FLAGS.arch,
      FLAGS.checkpoint,
      FLAGS.workdir,
      dataset=FLAGS.dataset,
      input_norm=FLAGS.input_norm,
    )
  torch_workdir.write(FLAGS.workdir, config, state, provenance)
  if provenance["ignored_keys"]:
    logging.info("ignored (unused by the forward pass): %s", ", ".join(provenance["ignored_keys"]))
  logging.info(
    "imported %s (%s, %s) as %s on %s; input normalisation %s",
    FLAGS.checkpoint,
    provenance["format"],
    FLAGS.arch,
    FLAGS.workdir,
    provenance["dataset"],
    provenance["input_norm_applied"],
  )
  print(
    json.dumps(
      {
        "workdir": FLAGS.workdir,
        "arch": FLAGS.arch,
        "dataset": provenance["dataset"],
        "input_norm": provenance["input_norm_applied"],
        "step": 0,
      }
    )
  )


if __name__ == "__main__":
  app.run(main)
