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
import os

from absl import app, flags, logging

from launch import common

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "agad workdir (trained, or written by launch.import_torch).")
flags.DEFINE_string("output", None, "The .safetensors file to write.")
flags.DEFINE_string("step", "best", "best | latest | a step number.")
flags.DEFINE_enum("params", "params", ["params", "ema"], "The weights: params or the EMA.")
flags.mark_flags_as_required(["workdir", "output"])


def check(workdir: str, output: str, step="best") -> None:
  """The flags, before any work: a workdir with checkpoints, a saved step, a backbone with a
  PyTorch counterpart, a .safetensors output."""
  from agad import api
  from agad.interop import torch_checkpoint as tc
  if not (isinstance(output, str) and output.endswith(".safetensors")):
    raise ValueError(f"--output={output!r} is invalid: a file name ending in .safetensors")
  common._check_workdir("workdir", workdir)
  common._check_step("step", step, workdir)
  tc.check_arch(api.load_config(workdir).model.name)


def export(workdir: str, output: str, *, step="best", params: str = "params") -> dict:
  """Writes ``output``; returns its metadata. Raises ``CheckpointMismatch`` when the model
  is not a bare backbone (a defense's plug-in has no PyTorch counterpart)."""
  from agad import api
  from agad import checkpoint as ckpt_lib
  from agad.interop import torch_checkpoint as tc

  config = api.load_config(workdir)
  loaded = api.load(workdir, step, params=params, config=config)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), create=False)
  try:
    meta = ckpt.read_meta(loaded.step)
  finally:
    ckpt.close()
  counters = meta.get("imported", {}).get("num_batches_tracked")
  variables = {k: v for k, v in loaded.variables.items() if k in ("params", "batch_stats")}
  tensors = tc.variables_to_torch(config.model.name, variables, image_shape=loaded.info.image_shape,
                                  num_batches_tracked=counters)
  model = loaded.model
  dataset_norm = model.input_norm == "dataset"
  metadata = {"format": "pt", "agad_arch": config.model.name, "dataset": config.data.name,
              "step": str(loaded.step), "weights": params, "input_norm": model.input_norm,
              "mean": json.dumps(list(model.mean)) if dataset_norm else "",
              "std": json.dumps(list(model.std)) if dataset_norm else ""}
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  tc.write_safetensors(output, tensors, metadata)
  return metadata


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.init_runtime()
  from agad.interop.torch_checkpoint import CheckpointMismatch
  with common.refuse_bad_input():
    check(FLAGS.workdir, FLAGS.output, FLAGS.step)
  try:
    metadata = export(FLAGS.workdir, FLAGS.output, step=FLAGS.step, params=FLAGS.params)
  except CheckpointMismatch as e:
    common.fatal(e)
  how = {"dataset": f"(x - {metadata['mean']}) / {metadata['std']} of [0, 1] pixels",
         "per_image": "each image standardised per channel (x - mean_hw) / sqrt(var_hw + 1e-5)",
         "none": "[0, 1] pixels as they are"}[metadata["input_norm"]]
  logging.info("wrote %s (%s, step %s); the PyTorch network expects %s", FLAGS.output,
               metadata["agad_arch"], metadata["step"], how)
  print(json.dumps({"output": FLAGS.output, **metadata}))


if __name__ == "__main__":
  app.run(main)
