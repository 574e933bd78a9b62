"""The work behind ``launch.import_torch`` and ``launch.export_torch`` (no flags: importable
by both and by tools/torch_parity.py).

Import writes what ``launch.train`` writes (``config.json``, ``run_record.json``, an Orbax
checkpoint at step 0 with the weights and BatchNorm running statistics), so that
``launch.evaluate``, ``launch.attention``, ``agad.load`` and ``--config.init.workdir`` take
the workdir unchanged. The config is ``configs/<dataset>.py:ARCH,standard`` with the input
normalisation of ``--input_norm``; the objective is ``standard`` (the training recipe of a
published checkpoint is unknown to agad, so evaluation runs no defense-specific attack).
Export writes the workdir's backbone under the PyTorch key names, with the input
normalisation in the file's metadata.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os

from launch import common

DATASETS = ("fashion_mnist", "cifar10", "cifar100", "svhn", "tiny_imagenet")
# ImageNet's statistics (torchvision), used by some CIFAR checkpoints fine-tuned from it.
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def resolve_input_norm(
  value: str, extras: dict, channels: int
) -> tuple[str, tuple | None, tuple | None, str]:
  """``--input_norm`` -> ``(model.input_norm, model.mean, model.std, description)``."""
  from agad import data as data_lib

  has_buffers = "input_mean" in extras
  if has_buffers and value not in ("auto", "checkpoint"):
    raise ValueError(
      f"--input_norm={value!r}: the checkpoint normalises inside the model (mu="
      f"{extras['input_mean']}, sigma={extras['input_std']}); keep --input_norm=auto"
    )
  if value in ("auto", "checkpoint"):
    if has_buffers:
      mean, std, what = (
        tuple(extras["input_mean"]),
        tuple(extras["input_std"]),
        "the checkpoint's mu/sigma",
      )
    elif value == "checkpoint":
      raise ValueError(
        "--input_norm=checkpoint: the checkpoint has no mu/sigma buffers; use none, "
        "a dataset name, imagenet or MEAN,../STD,.."
      )
    else:
      return "none", None, None, "none ([0, 1] pixels)"
  elif value == "none":
    return "none", None, None, "none ([0, 1] pixels)"
  elif value == "imagenet":
    (mean, std), what = IMAGENET, "imagenet"
  elif (value in data_lib.DATASET_NAMES and value != "synthetic") or value == "svhn":
    name = "svhn_cropped" if value == "svhn" else value
    info = data_lib.dataset_info(type("Cfg", (), {"name": name})())
    mean, std, what = info.mean, info.std, value
  elif "/" in value:
    try:
      mean, std = (tuple(float(v) for v in part.split(",")) for part in value.split("/"))
    except ValueError:
      raise ValueError(
        f"--input_norm={value!r} is invalid: MEAN,../STD,.. takes numbers, e.g. "
        "0.5,0.5,0.5/0.25,0.25,0.25"
      ) from None
    what = "custom"
  else:
    raise ValueError(
      f"--input_norm={value!r} is invalid: auto | none | checkpoint | imagenet | "
      f"{' | '.join(n for n in data_lib.DATASET_NAMES if n != 'synthetic')} | MEAN,../STD,.."
    )
  if len(mean) not in (1, channels) or len(std) not in (1, channels) or min(std) <= 0:
    raise ValueError(
      f"--input_norm={value!r}: mean {mean} / std {std} must have 1 or {channels} "
      "values and a positive std"
    )
  return "dataset", tuple(mean), tuple(std), f"{what}: (x - {list(mean)}) / {list(std)}"


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def prepare(
  arch: str, checkpoint: str, workdir: str, *, dataset: str | None = None, input_norm: str = "auto"
):
  """Reads and converts the checkpoint, refusing bad input before anything is written:
  ``(config, TrainState with the imported weights, provenance)``."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from agad import data as data_lib, defenses
  from agad.interop import torch_checkpoint as tc
  from agad.training import builders
  from agad.training.state import init_train_state

  tc.check_arch(arch)
  if not os.path.isfile(checkpoint):
    raise FileNotFoundError(f"--checkpoint={checkpoint!r}: no such file")
  if os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(
    os.path.join(workdir, "checkpoints")
  ):
    raise ValueError(
      f"--workdir={workdir!r} already holds checkpoints; import into a new directory"
    )
  dataset = dataset or ("fashion_mnist" if arch == "smallcnn" else "cifar10")
  config = importlib.import_module(f"configs.{dataset}").get_config(f"{arch},standard")
  info = data_lib.dataset_info(config.data)
  state_dict, fmt = tc.read_state_dict(checkpoint)
  variables, extras = tc.torch_to_variables(
    arch, state_dict, image_shape=info.image_shape, num_classes=info.num_classes
  )
  norm, mean, std, norm_note = resolve_input_norm(input_norm, extras, info.image_shape[-1])
  with config.unlocked():
    config.model.input_norm = norm
    config.model.mean, config.model.std = mean, std
    config.ema_decay = 0.0  # one set of weights
  builders.check_config(config, num_devices=1)
  model = defenses.build_model(config, info)
  objective = defenses.build_objective(config.objective.name, model, config)
  tx, _ = builders.build_optimizer(config, builders.Experiment(None, info, model, objective), 1)
  h, w, c = info.image_shape
  sample = {"image": np.zeros((1, h, w, c), np.float32), "label": np.zeros((1,), np.int32)}
  imported = jax.tree.map(jnp.asarray, variables)
  # The config's model must have exactly the converted tree (abstract shapes: no compute).
  built = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), sample["image"])
  built = {k: built[k] for k in imported}
  if jax.tree.map(lambda a: a.shape, built) != jax.tree.map(lambda a: a.shape, imported):
    raise ValueError(
      f"{config.model.name} built from {dataset}'s config does not match the converted tree"
    )

  class Imported:  # init_train_state's model, initialised to the imported variables
    init = staticmethod(lambda *args, **kw: imported)

  state = init_train_state(
    Imported(), objective, tx, sample, jax.random.key(config.seed), ema_decay=0.0
  )
  provenance = {
    "checkpoint": os.path.abspath(checkpoint),
    "sha256": sha256(checkpoint),
    "format": fmt,
    "arch": arch,
    "dataset": dataset,
    "input_norm": input_norm,
    "input_norm_applied": norm_note,
    "ignored_keys": extras["ignored"],
    "num_batches_tracked": extras["num_batches_tracked"],
  }
  return config, state, provenance


def write(workdir: str, config, state, provenance: dict) -> None:
  """What ``launch.train`` writes before its first step, with ``state`` saved as step 0."""
  from agad import checkpoint as ckpt_lib
  from agad.training import records

  os.makedirs(workdir, exist_ok=True)
  records.write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
  ckpt = ckpt_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    keep=config.checkpoint.keep,
    best_metric=ckpt_lib.best_metric_for(config),
    async_save=False,
  )
  try:
    ckpt.save(
      0,
      state,
      data_state={},
      meta={
        "step": 0,
        "epoch": 0.0,
        "metrics": {},
        "best_metric": ckpt.best_metric,
        "imported": provenance,
      },
    )
  finally:
    ckpt.close()
  records.write_json(
    os.path.join(workdir, "run_record.json"),
    {"launches": [dict(records.run_record(config), start_step=0, imported=provenance)]},
  )


def import_checkpoint(arch: str, checkpoint: str, workdir: str, **kw) -> dict:
  """:func:`prepare` then :func:`write`; returns the provenance recorded in the workdir."""
  config, state, provenance = prepare(arch, checkpoint, workdir, **kw)
  write(workdir, config, state, provenance)
  return provenance


def check_export(workdir: str, output: str, step="best") -> None:
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
  tensors = tc.variables_to_torch(
    config.model.name, variables, image_shape=loaded.info.image_shape, num_batches_tracked=counters
  )
  model = loaded.model
  dataset_norm = model.input_norm == "dataset"
  metadata = {
    "format": "pt",
    "agad_arch": config.model.name,
    "dataset": config.data.name,
    "step": str(loaded.step),
    "weights": params,
    "input_norm": model.input_norm,
    "mean": json.dumps(list(model.mean)) if dataset_norm else "",
    "std": json.dumps(list(model.std)) if dataset_norm else "",
  }
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  tc.write_safetensors(output, tensors, metadata)
  return metadata
