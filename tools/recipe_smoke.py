"""Dev tool: one training step of every paper recipe config on synthetic data of its shape.

    python tools/recipe_smoke.py [--only=cifar10:wrn28_10,afa_stage2 ...] [--workdir=runs/recipes]

The CIFAR/SVHN datasets need TFDS files this machine cannot download, so each recipe
(``configs/<dataset>.py:<model>,<spec>`` with its epochs, lr steps, eps, attack and
backbone unchanged) runs on ``data.name=synthetic`` images of the dataset's shape and
class count: teacher runs first where the recipe needs one (ATAT: a ``standard`` run of
the same backbone with the student's per-image standardisation; AGKD-BML: the same with
label smoothing 0.5 over the other classes and [-1, 1] inputs;
AFA stage II: its stage-I run), then ``stop_after_steps=1`` with a small batch, then
``agad.load`` of the saved checkpoint and one forward pass of the deployed model and of
every adaptive-loss variant. Prints one line per run (wall time, loss, parameters) and
exits non-zero if any run fails. Not part of CI (minutes per WRN on a CPU).
"""

from __future__ import annotations

import importlib
import os
import tempfile
import time
import traceback

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("only", None, "Run only this recipe (DATASET:MODEL,SPEC; repeatable).")
flags.DEFINE_string("workdir", None, "Parent folder of the runs (default: a temporary folder).")
flags.DEFINE_integer("batch", 4, "Global batch of the smoke step.")

SHAPES = {"cifar10": ((32, 32, 3), 10), "cifar100": ((32, 32, 3), 100), "svhn": ((32, 32, 3), 10)}
# (dataset, model, spec, what runs first: None | ("teacher", overrides) | ("stage1", spec)).
RECIPES = [
  ("cifar10", "resnet18", "fsr", None),
  ("cifar10", "resnet18", "trades+fsr", None),
  ("cifar10", "wrn34_10", "again+awp", None),
  ("cifar100", "wrn34_10", "again+awp", None),
  # ATAT's student standardises each image (the code's per_image_standardization); its
  # teacher must too (the student starts from it).
  ("cifar10", "wrn34_10", "atat", ("teacher", {"model.input_norm": "per_image"})),
  # AGKD-BML's code feeds [-1, 1] inputs (mean = std = 0.5) to teacher and student alike.
  (
    "cifar10",
    "wrn28_10",
    "agkd_bml",
    (
      "teacher",
      {
        "objective.standard.label_smoothing": 0.5,
        "objective.standard.smoothing": "others",
        "model.input_norm": "dataset",
        "model.mean": (0.5, 0.5, 0.5),
        "model.std": (0.5, 0.5, 0.5),
      },
    ),
  ),
  ("cifar10", "wrn28_10", "afa_stage2", ("stage1", "afa")),
  ("svhn", "wrn16_8", "afa_stage2", ("stage1", "afa")),
]


def _set(config, key, value):
  node = config
  *path, leaf = key.split(".")
  for p in path:
    node = node[p]
  node[leaf] = value


def _config(dataset, model, spec, overrides=None):
  config = importlib.import_module(f"configs.{dataset}").get_config(f"{model},{spec}")
  shape, classes = SHAPES[dataset]
  for key, value in {
    "data.name": "synthetic",
    "data.image_shape": shape,
    "data.num_classes": classes,
    "data.num_train": 48,
    "data.num_test": 8,
    "data.val_size": 16,
    "data.max_train": None,
    "data.max_test": None,
    "batch_size": FLAGS.batch,
    "validation.batch_size": FLAGS.batch,
    "eval.batch_size": FLAGS.batch,
    "stop_after_steps": 1,
    "checkpoint.async_save": False,
    "log_every_steps": 1,
    **(overrides or {}),
  }.items():
    _set(config, key, value)
  return config


def _train(config, workdir):
  import numpy as np
  from agad.training import loop

  t0 = time.time()
  trainer = loop.Trainer(config, workdir)
  state = trainer.run()
  import jax

  n = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))
  return time.time() - t0, n


def _check_deployed(workdir):
  import jax.numpy as jnp
  import numpy as np
  import agad

  loaded = agad.load(workdir, "latest")
  test = loaded.splits().test
  x = jnp.asarray(test.images[:4], jnp.float32) / 255.0
  y = jnp.asarray(test.labels[:4])
  logits = np.asarray(loaded.logits_fn(x))
  assert logits.shape == (4, loaded.info.num_classes) and np.all(np.isfinite(logits)), logits.shape
  factory = loaded.objective().adaptive_loss
  variants = {}
  if factory is not None:
    from agad.objectives.base import adaptive_variants

    for name, fn in adaptive_variants(factory(loaded.model, loaded.variables)).items():
      v = np.asarray(fn(x, y))
      assert v.shape == (4,) and np.all(np.isfinite(v)), (name, v)
      variants[name] = float(v.mean())
  return variants


def run_recipe(root, dataset, model, spec, first):
  tag = f"{dataset}:{model},{spec}"
  workdir = os.path.join(root, tag.replace(":", "_").replace(",", "_").replace("+", "_"))
  overrides = {}
  if first and first[0] == "teacher":
    teacher = workdir + "_teacher"
    wall, _ = _train(_config(dataset, model, "standard", first[1]), teacher)
    print(f"  teacher {model},standard {first[1] or ''}: {wall:.0f} s", flush=True)
    name = spec.split("+")[0]
    overrides = {f"objective.{name}.teacher.workdir": teacher, "init.workdir": teacher}
  elif first and first[0] == "stage1":
    stage1 = workdir + "_stage1"
    wall, _ = _train(_config(dataset, model, first[1]), stage1)
    print(f"  stage I {model},{first[1]}: {wall:.0f} s", flush=True)
    overrides = {"init.workdir": stage1}
  config = _config(dataset, model, spec, overrides)
  wall, params = _train(config, workdir)
  variants = _check_deployed(workdir)
  print(
    f"{tag}: OK, 1 step in {wall:.0f} s (compile included), {params:,} params, epochs "
    f"{config.num_epochs}, lr {config.optim.lr}, eps {config.attack.eps:.4g}, attack "
    f"PGD-{config.attack.steps}, adaptive variants {sorted(variants) or '-'}",
    flush=True,
  )


def main(argv):
  del argv
  from launch import common

  common.init_runtime()
  logging.set_verbosity(logging.WARNING)
  root = FLAGS.workdir or tempfile.mkdtemp(prefix="agad_recipes_")
  failed = []
  for dataset, model, spec, first in RECIPES:
    tag = f"{dataset}:{model},{spec}"
    if FLAGS.only and tag not in FLAGS.only:
      continue
    try:
      run_recipe(root, dataset, model, spec, first)
    except Exception:  # noqa: BLE001 - report every recipe, fail at the end
      failed.append(tag)
      print(f"{tag}: FAILED\n{traceback.format_exc()}", flush=True)
  print(f"{len(failed)} failed: {failed}" if failed else "all recipes passed")
  raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
  app.run(main)
