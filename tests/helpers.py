"""Shared test fixtures: a tiny synthetic config that trains in seconds."""

from configs import fashion_mnist


def train_tiny(workdir, spec: str, model: str = "smallcnn", **overrides):
  """Trains ``spec`` on the tiny synthetic config (16x16 images so SmallCNN fits) through the
  training loop in this process; returns ``(config, metrics.jsonl lines)``."""
  import json
  import os

  from agad.training import loop

  config = tiny_config(
    spec,
    model,
    **{"data.image_shape": (16, 16, 1), "num_epochs": 1, "log_every_steps": 1, **overrides},
  )
  trainer = loop.Trainer(config, str(workdir))
  trainer.run()
  assert trainer.train_traces == 1
  return config, [json.loads(l) for l in open(os.path.join(str(workdir), "metrics.jsonl"))]


def tiny_config(objective: str = "pgd_at", model: str = "tiny_bn", **overrides):
  c = fashion_mnist.get_config(f"{model},{objective},smoke")
  c.data.name = "synthetic"
  c.data.num_train = 96
  c.data.num_test = 32
  c.data.val_size = 16
  c.data.max_train = None
  c.data.max_test = None
  c.data.image_shape = (8, 8, 1)
  c.batch_size = 16
  c.num_epochs = 2
  c.attack.steps = 2
  c.validation.attack.steps = 1
  c.validation.batch_size = 16
  c.eval.batch_size = 16
  c.eval.pgd_steps = 2
  c.log_every_steps = 2
  c.checkpoint.async_save = False
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


# Shared toy classifier of the attack tests: 4x4x3 inputs, 10 classes, linear logits.
ATTACK_SHAPE = (4, 4, 3)
ATTACK_DIM = 48
ATTACK_CLASSES = 10


def linear_logits(w, b, x):
  """``x [B, 4, 4, 3] -> x_flat @ w + b`` (wrap in ``jax.tree_util.Partial``)."""
  return x.reshape(x.shape[0], -1) @ w + b


def objective_defaults(names=("standard", "pgd_at", "trades", "mart", "alp", "iat", "awp", "cas")):
  """``config.objective`` with every named module's DEFAULTS (for hand-built configs)."""
  import ml_collections

  from agad import defenses

  c = ml_collections.ConfigDict()
  for name in names:
    c[name] = defenses.defaults(name)
  return c


# Tolerance policy (docs/testing.md). Bitwise equality (``chex.assert_trees_all_equal``)
# only where the *same compiled program* runs twice on the same inputs: a resume, a cache
# replay, sharded vs sharded, the same jitted function called again. Anything that crosses
# a jit boundary (jitted vs eager), a different batch split, device count or a different
# program compares with float32 tolerances: XLA may fuse, reorder and vectorise each program
# differently on each CPU (AVX2 vs AVX-512), which moves results by a few ulps.
F32 = dict(rtol=1e-5, atol=1e-6)


def assert_close(actual, expected, **tol):
  """``chex.assert_trees_all_close`` with the float32 cross-program tolerances ``F32``."""
  import chex

  chex.assert_trees_all_close(actual, expected, **{**F32, **tol})


def assert_max_gradient_jitted_equals_eager(head, out_shape, seed: int = 1):
  """The gradient of ``sum(w * head(relu(BN(conv(x)))))`` with respect to x, the kernel and
  BN's scale and bias is finite and equal jitted and op by op. ``head`` takes a max (or min)
  over the features: the max's gradient is a mask "equals the max", and in the suite's
  cheap-compile mode XLA once computed the BN multiply-add twice, with and without FMA, for
  the max and for its mask (max_pool_2x2, docs/results/numerics.md): most of the gradient
  was lost, or 0/0. Features ``[4, 8, 8, 8]``; ``out_shape`` is head's output shape."""
  import chex
  import jax
  import jax.numpy as jnp

  def f(x, kernel, scale, bias, w):
    y = jax.lax.conv_general_dilated(
      x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    mean, var = y.mean((0, 1, 2)), y.var((0, 1, 2))
    z = (y - mean) * (jax.lax.rsqrt(var + 1e-5) * scale) + bias
    return jnp.sum(w * head(jax.nn.relu(z)))

  ks = jax.random.split(jax.random.key(seed), 5)
  args = (
    jax.random.uniform(ks[0], (4, 10, 10, 3)),
    jax.random.normal(ks[1], (3, 3, 3, 8)),
    1.0 + 0.1 * jax.random.normal(ks[2], (8,)),
    0.1 * jax.random.normal(ks[3], (8,)),
    jax.random.normal(ks[4], out_shape),
  )
  grad = jax.grad(f, argnums=(0, 1, 2, 3))
  jitted = jax.jit(grad)(*args)
  with jax.disable_jit():  # op by op: the max and its mask see the same array
    eager = grad(*args)
  chex.assert_tree_all_finite(jitted)
  chex.assert_trees_all_close(jitted, eager, rtol=1e-5, atol=1e-5)
