"""Export an agad workdir's weights as a PyTorch state dict (safetensors).

  python -m launch.export_torch --workdir=DIR --output=FILE.safetensors [--step=best]

The keys are those of the public PyTorch definition of the workdir's backbone (see
agad/interop/torch_checkpoint.py and docs/pytorch.md), so
``model.load_state_dict(safetensors.torch.load_file(FILE), strict=True)`` loads them. The
file's metadata records the input normalisation the network expects (``input_norm``,
``mean``, ``std``): agad models normalise inside, PyTorch's definitions do not.
"""

from __future__ import annotations

import json

from absl import app, flags, logging

from launch import common, torch_workdir

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "agad workdir (trained, or written by launch.import_torch).")
flags.DEFINE_string("output", None, "The .safetensors file to write.")
flags.DEFINE_string("step", "best", "best | latest | a step number.")
flags.DEFINE_enum("params", "params", ["params", "ema"], "The weights: params or the EMA.")
flags.mark_flags_as_required(["workdir", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.init_runtime()
  from agad.interop.torch_checkpoint import CheckpointMismatch

  with common.refuse_bad_input():
    torch_workdir.check_export(FLAGS.workdir, FLAGS.output, FLAGS.step)
  try:
    metadata = torch_workdir.export(
      FLAGS.workdir, FLAGS.output, step=FLAGS.step, params=FLAGS.params
    )
  except CheckpointMismatch as e:
    common.fatal(e)
  how = {
    "dataset": f"(x - {metadata['mean']}) / {metadata['std']} of [0, 1] pixels",
    "per_image": "each image standardised per channel (x - mean_hw) / sqrt(var_hw + 1e-5)",
    "none": "[0, 1] pixels as they are",
  }[metadata["input_norm"]]
  logging.info(
    "wrote %s (%s, step %s); the PyTorch network expects %s",
    FLAGS.output,
    metadata["agad_arch"],
    metadata["step"],
    how,
  )
  print(json.dumps({"output": FLAGS.output, **metadata}))


if __name__ == "__main__":
  app.run(main)
