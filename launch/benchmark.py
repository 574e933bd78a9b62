"""Benchmarks that print figures (never timed assertions in tests).

Train mode (default): compile time and steady-state images/s of the jitted
adversarial-training step of a config on synthetic inputs, plus peak memory
(process RSS on CPU, device peak bytes on GPU/TPU).

  python -m launch.benchmark --config=configs/cifar10.py:resnet18,pgd_at --batch_size=128
  python -m launch.benchmark --config=configs/fashion_mnist.py --steps=10
  python -m launch.benchmark --config=configs/fashion_mnist.py --mode=eval   # PGD-20 images/s
  python -m launch.benchmark --mode=autoattack --workdir=runs/x --num_examples=500

AutoAttack's cost depends on how robust the model is (each stage runs only on points
still robust), so its mode measures a trained checkpoint on real test images.
"""

import resource
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from launch import common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", None, "Config to benchmark (train/eval modes).", lock_config=True
)
flags.DEFINE_integer("batch_size", None, "Global batch (default: the config's).")
flags.DEFINE_integer("steps", 5, "Timed steps after the warm-up step.")
flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "eval", "autoattack"],
  "train: AT step; eval: PGD-k attack; autoattack: AA standard on a checkpoint.",
)
flags.DEFINE_string("workdir", None, "autoattack mode: the trained workdir to attack.")
flags.DEFINE_integer("num_examples", 500, "autoattack mode: first N test images.")
flags.DEFINE_integer("pgd_steps", 20, "eval mode: PGD steps.")
flags.DEFINE_string("driver", "auto", "eval mode: attack driver (auto|unroll|loop|host).")


def peak_memory() -> str:
  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return f"device peak {stats['peak_bytes_in_use'] / 2**30:.2f} GiB"
  return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def synthetic_batch(info, batch_size, sharding):
  h, w, c = info.image_shape
  rng = np.random.RandomState(0)
  batch = {
    "image": rng.rand(batch_size, h, w, c).astype(np.float32),
    "label": rng.randint(0, info.num_classes, batch_size).astype(np.int32),
  }
  return jax.device_put(batch, sharding)


def main(argv):
  del argv
  common.init_runtime()
  from agad.attacks import iterative
  from agad import sharding
  from agad.training import builders, state as state_lib, step as step_lib
  from agad import data as data_lib
  from agad.api import make_logits_fn

  if FLAGS.mode == "autoattack":
    return benchmark_autoattack()
  if FLAGS.config is None:
    common.fatal("--config is required for the train and eval modes")
  config = FLAGS.config
  batch_size = FLAGS.batch_size or config.batch_size
  mesh = sharding.make_mesh()
  sharding.check_divisible(batch_size, mesh)
  info = data_lib.dataset_info(config.data)  # Synthetic inputs: no dataset needed.
  from agad import defenses

  model = defenses.build_model(config, info)
  objective = defenses.build_objective(config.objective.name, model, config)
  if objective.frozen is not None:
    common.fatal(
      f"{config.objective.name} needs frozen inputs (a teacher): benchmark it "
      "through launch.train --config.stop_after_steps=N"
    )
  tx, schedule = builders.optim.make_optimizer(config.optim, 100, config.num_epochs)
  rep, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
  batch = synthetic_batch(info, batch_size, data)
  state = jax.jit(
    lambda k, b: state_lib.init_train_state(model, objective, tx, b, k, ema_decay=config.ema_decay),
    out_shardings=rep,
  )(jax.random.key(0), batch)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  what = (
    f"{config.model.name} ({n_params / 1e6:.2f}M params) {config.objective.name} "
    f"PGD-{config.attack.steps} on {info.image_shape}, global batch {batch_size}, "
    f"{mesh.devices.size} x {jax.devices()[0].device_kind}, dtype {config.model.dtype}"
  )

  if FLAGS.mode == "train":
    step = jax.jit(
      step_lib.make_train_step(objective, tx, ema_decay=config.ema_decay),
      in_shardings=(rep, data, rep),
      out_shardings=(rep, rep),
      donate_argnums=(0,),
    )
    frozen = None  # (state, batch, frozen): objectives with frozen inputs are refused above.
    t0 = time.perf_counter()
    state, metrics = step(state, batch, frozen)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(FLAGS.steps):
      t = time.perf_counter()
      state, metrics = step(state, batch, frozen)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t)
    med = float(np.median(times))
    print(
      f"[train] {what}: first step (compile+run) {compile_s:.1f} s; "
      f"steady {med:.3f} s/step (median of {len(times)}), {batch_size / med:.0f} images/s; {peak_memory()}"
    )
  else:
    variables = {"params": state.params, **state.model_state}
    logits_fn = make_logits_fn(model, variables)
    eps, size = config.eval.eps, config.eval.step_size
    run = lambda k: iterative.pgd(
      logits_fn,
      batch["image"],
      batch["label"],
      k,
      eps=eps,
      step_size=size,
      steps=FLAGS.pgd_steps,
      driver=FLAGS.driver,
    )
    t0 = time.perf_counter()
    jax.block_until_ready(run(jax.random.key(0)))
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(FLAGS.steps):
      t = time.perf_counter()
      jax.block_until_ready(run(jax.random.key(i + 1)))
      times.append(time.perf_counter() - t)
    med = float(np.median(times))
    print(
      f"[eval] PGD-{FLAGS.pgd_steps} driver={FLAGS.driver} on {what}: first call {compile_s:.1f} s; "
      f"steady {med:.3f} s/batch, {batch_size / med:.0f} images/s; {peak_memory()}"
    )


def benchmark_autoattack():
  from agad import api, data as data_lib
  from agad.attacks import autoattack

  if not FLAGS.workdir:
    common.fatal("--mode=autoattack needs --workdir of a trained run")
  loaded = api.load(FLAGS.workdir, "best")
  test = loaded.splits().test
  batch = data_lib.read_batch(test, np.arange(min(FLAGS.num_examples, len(test))))
  images = batch["image"].astype(np.float32) / 255.0
  eps = float(loaded.config.eval.eps)
  t0 = time.perf_counter()
  out = autoattack(
    loaded.logits_fn,
    images,
    batch["label"],
    jax.random.key(0),
    eps=eps,
    version="standard",
    batch_size=FLAGS.batch_size or 250,
  )
  wall = time.perf_counter() - t0
  times = {k: round(v, 1) for k, v in (out.get("times") or {}).items()}
  print(
    f"[autoattack] {loaded.config.model.name} {loaded.config.objective.name} step {loaded.step}, "
    f"{len(images)} images, eps {eps:.4g}: {wall:.0f} s wall ({len(images) / wall:.2f} images/s, "
    f"compiles included); clean {100 * out['clean_accuracy']:.2f}% -> robust "
    f"{100 * float(np.mean(out['robust'])):.2f}%; per stage {times}; {peak_memory()}"
  )


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
