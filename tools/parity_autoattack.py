"""Dev-only parity check: agad's JAX AutoAttack against the reference PyTorch AutoAttack.

  bash launch/env_parity.sh      # once: .venv-parity with torch + pyautoattack (never agad deps)
  .venv-parity/bin/python tools/parity_autoattack.py [--n=200] [--eps=0.1] [--masked]
      [--square_queries=5000] [--tolerance_pp=1.5] [--params_cache=PATH] [--output=JSON]
  .venv-parity/bin/python tools/parity_autoattack.py --timing --threads=1 [--repeats=2]
      [--agad_root=TREE]   # per-attack wall times, side by side (see timing())
  .venv-parity/bin/python tools/aa_timing_compare.py --before=REV   # two revisions + ref

The reference is ``pyautoattack==0.2.0`` (its attack files match fra31/auto-attack@a392200
up to whitespace and imports) on torch 2.13 (CPU). The script

1. trains a tiny conv net (conv 3x3x8 + ReLU, conv 3x3x16 stride 2 + ReLU, dense 10; both
   convs padded by 1 on every side so the two frameworks align) on Fashion-MNIST in JAX
   with PGD-3 adversarial training at eps (a few hundred Adam steps), ports the weights
   to the same network in torch (HWIO -> OIHW kernels; the dense rows reordered from the
   NHWC flatten to the NCHW one) and checks that the logits agree (max abs difference
   below ``--logit_tolerance``) on the evaluation images, clean and quantised;
2. runs, on the first ``--n`` test images at ``--eps``, each of APGD-CE, APGD-T, FAB-T
   and Square alone from the clean images, then the full ``version="standard"`` chain,
   in both implementations with the reference constants (100 iterations, 1 restart, 9
   target classes, Square 5000 queries with p_init 0.8 and no schedule rescaling);
3. prints per attack the robust accuracy of both, their difference in percentage points,
   the per-example agreement (fraction of points on which both say robust / broken) and
   the wall time of each (agad's includes JIT compilation), then the standard chain stage
   by stage.

``--masked`` evaluates the same weights behind an input quantiser ``x -> round(x * L) / L``
(``L = --levels``) whose input gradient is exactly zero (``jnp.round`` under
``stop_gradient`` in JAX, ``torch.round`` in torch, whose derivative is zero: no
straight-through estimator). Gradient-based attacks (APGD, FAB) should then fail in both
implementations and Square should break the model in both.

Before the attacks, ``--components`` compares building blocks with the reference's own
functions, deterministically: the DLR / targeted-DLR losses, the target order, APGD's
checkpoints, Square's p schedule and square sides, FAB's L-inf projection, and APGD-CE /
APGD-T (first target) started by both from the same point (reported only: sign steps may
part on rounding-level gradient differences). FAB-T's first restart has no randomness, so
its per-example agreement in the table is a near-deterministic check as well.

Exit status: 0 on parity; 1 if the standard-AA robust accuracies differ by more than
``--tolerance_pp`` percentage points or an exact component check fails; 2 if the two
ports' logits disagree. The tolerance
is statistical, not a rounding slack: with different random numbers (start points,
Square's squares) the two implementations legitimately flip borderline points, and one
point is 100/N pp (0.5 pp at N=200), so the default 1.5 pp allows three such points.
Per-attack differences are reported, not enforced (Square alone flips more points).
"""

from __future__ import annotations

import json
import logging as py_logging
import math
import os
import re
import sys
import time
import types
from typing import Any, Callable, Sequence

from absl import app, flags
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_integer("n", 200, "Evaluate on the first N Fashion-MNIST test images.")
flags.DEFINE_float("eps", 0.1, "L-inf radius in [0, 1] pixel units (training and attacks).")
flags.DEFINE_integer(
  "square_queries", 5000, "Square queries (reference: 5000); lower it for a quick run."
)
flags.DEFINE_bool("masked", False, "Quantise the input with a zero gradient (gradient masking).")
flags.DEFINE_integer("levels", 16, "Quantisation levels of --masked: x -> round(x * L) / L.")
flags.DEFINE_list(
  "attacks",
  ["apgd-ce", "apgd-t", "fab-t", "square"],
  "Attacks run alone from the clean images (empty: only the standard chain).",
)
flags.DEFINE_bool("standard", True, "Also run the full version='standard' chain in both.")
flags.DEFINE_bool(
  "components",
  True,
  "First run the deterministic component checks (losses, "
  "schedules, FAB projection, APGD from a shared start).",
)
flags.DEFINE_float(
  "tolerance_pp", 1.5, "Largest |AA_ref - AA_agad| in percentage points for exit 0."
)
flags.DEFINE_float("logit_tolerance", 1e-4, "Largest max-abs logit difference between the ports.")
flags.DEFINE_integer("batch_size", 250, "Batch size of both implementations.")
flags.DEFINE_integer("seed", 0, "Seed of training, the reference's attacks and agad's key.")
flags.DEFINE_integer("train_steps", 400, "Adam steps of PGD-3 adversarial training.")
flags.DEFINE_integer("train_batch", 128, "Training batch size.")
flags.DEFINE_float("learning_rate", 2e-3, "Adam learning rate.")
flags.DEFINE_integer(
  "torch_threads",
  1,
  "torch.set_num_threads (0: torch's default). One "
  "thread: on a busy machine torch's OpenMP threads wait on each other "
  "(measured 2.8x slower with 2 threads on 2 loaded cores).",
)
flags.DEFINE_integer(
  "threads",
  0,
  "Thread count of BOTH frameworks (0: leave as set by "
  "--torch_threads and XLA's defaults): pins the process to the first N CPUs "
  "it may use (before JAX and torch start), torch.set_num_threads(N), and for "
  "N = 1 --xla_cpu_multi_thread_eigen=false. Use it with --timing.",
)
flags.DEFINE_bool(
  "timing",
  False,
  "Timing mode: no parity verdict; run each of --attacks alone "
  "--repeats times, the reference and agad alternately (ABBA order) on the same "
  "model and images, and print per-attack wall times (agad cold = first call, "
  "compilation included; warm = later calls), robust accuracies, per-example "
  "agreement and agad's recompiles after the first call.",
)
flags.DEFINE_integer(
  "repeats", 2, "--timing: runs per attack and implementation (>= 2 gives a warm agad time)."
)
flags.DEFINE_string(
  "agad_root",
  None,
  "Import agad from this source tree instead (e.g. an older "
  "revision unpacked by tools/aa_timing_compare.py).",
)
flags.DEFINE_string(
  "params_cache",
  None,
  "Optional .npz: load the trained weights from it if "
  "it was written with the same training flags, else train and write it.",
)
flags.DEFINE_string("output", None, "Optional JSON file for the results.")
flags.DEFINE_bool("verbose", False, "Print the reference's and agad's progress logs.")

ATTACK_ORDER = ("apgd-ce", "apgd-t", "fab-t", "square")
HEIGHT, WIDTH, CHANNELS, CLASSES = 28, 28, 1, 10
HIDDEN1, HIDDEN2 = 8, 16
FEATURE_HW = 14  # after the stride-2 conv


# ------------------------------------------------------------------------------ JAX model


def init_params(key) -> dict[str, Any]:
  """He-normal conv / dense weights (NHWC, HWIO kernels), zero biases."""
  import jax
  import jax.numpy as jnp

  k1, k2, k3 = jax.random.split(key, 3)
  he = lambda k, shape, fan_in: jax.random.normal(k, shape, jnp.float32) * np.sqrt(2.0 / fan_in)
  features = FEATURE_HW * FEATURE_HW * HIDDEN2
  return {
    "conv1_w": he(k1, (3, 3, CHANNELS, HIDDEN1), 9 * CHANNELS),
    "conv1_b": jnp.zeros((HIDDEN1,), jnp.float32),
    "conv2_w": he(k2, (3, 3, HIDDEN1, HIDDEN2), 9 * HIDDEN1),
    "conv2_b": jnp.zeros((HIDDEN2,), jnp.float32),
    "dense_w": he(k3, (features, CLASSES), features) * 0.5,
    "dense_b": jnp.zeros((CLASSES,), jnp.float32),
  }


def _conv(x, w, b, stride: int):
  import jax

  y = jax.lax.conv_general_dilated(
    x,
    w,
    (stride, stride),
    ((1, 1), (1, 1)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision=jax.lax.Precision.HIGHEST,
  )
  return y + b


def jax_logits(params: dict[str, Any], x):
  """``x`` [B, 28, 28, 1] in [0, 1] -> logits [B, 10]."""
  import jax
  import jax.numpy as jnp

  h = jax.nn.relu(_conv(x, params["conv1_w"], params["conv1_b"], 1))
  h = jax.nn.relu(_conv(h, params["conv2_w"], params["conv2_b"], 2))
  h = h.reshape(h.shape[0], -1)
  return jnp.dot(h, params["dense_w"], precision=jax.lax.Precision.HIGHEST) + params["dense_b"]


def jax_quantised_logits(params: dict[str, Any], levels, x):
  """``jax_logits`` of ``round(x * levels) / levels``, whose input gradient is exactly 0."""
  import jax
  import jax.numpy as jnp

  return jax_logits(params, jax.lax.stop_gradient(jnp.round(x * levels) / levels))


def _pgd(params, x, y, key, eps: float, steps: int, step_size: float):
  """L-inf PGD on CE from a uniform start (training and the post-training check)."""
  import jax
  import jax.numpy as jnp
  import optax

  def loss(v):
    return optax.softmax_cross_entropy_with_integer_labels(jax_logits(params, v), y).sum()

  x_adv = jnp.clip(x + jax.random.uniform(key, x.shape, jnp.float32, -eps, eps), 0.0, 1.0)
  for _ in range(steps):
    x_adv = x_adv + step_size * jnp.sign(jax.grad(loss)(x_adv))
    x_adv = jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)
  return jax.lax.stop_gradient(x_adv)


def train(
  train_x: np.ndarray,
  train_y: np.ndarray,
  *,
  eps: float,
  steps: int,
  batch: int,
  learning_rate: float,
  seed: int,
  log: Callable[[str], None],
) -> dict[str, np.ndarray]:
  """PGD-3 adversarial training (step 2.5 eps / 3) with Adam; returns numpy params."""
  import jax
  import optax

  optimizer = optax.adam(learning_rate)

  @jax.jit
  def step(params, opt_state, x, y, key):
    x_adv = _pgd(params, x, y, key, eps, 3, 2.5 * eps / 3)

    def loss_fn(p):
      logits = jax_logits(p, x_adv)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    accuracy = (logits.argmax(-1) == y).mean()
    return optax.apply_updates(params, updates), opt_state, loss, accuracy

  key = jax.random.key(seed)
  params = init_params(jax.random.fold_in(key, 0))
  opt_state = optimizer.init(params)
  rng = np.random.default_rng(seed)
  start = time.time()
  for i in range(steps):
    idx = rng.choice(len(train_x), batch, replace=False)
    x = train_x[idx].astype(np.float32) / 255.0
    params, opt_state, loss, accuracy = step(
      params, opt_state, x, train_y[idx], jax.random.fold_in(key, i + 1)
    )
    if (i + 1) % 100 == 0 or i + 1 == steps:
      log(
        f"  train step {i + 1}/{steps}: adversarial loss {float(loss):.3f}, "
        f"adversarial batch accuracy {float(accuracy):.2%} ({time.time() - start:.0f} s)"
      )
  return {k: np.asarray(v) for k, v in params.items()}


def trained_params(train_x, train_y, log) -> dict[str, np.ndarray]:
  """The trained weights, from ``--params_cache`` when it matches the training flags."""
  signature = json.dumps(
    dict(
      eps=FLAGS.eps,
      steps=FLAGS.train_steps,
      batch=FLAGS.train_batch,
      lr=FLAGS.learning_rate,
      seed=FLAGS.seed,
    ),
    sort_keys=True,
  )
  path = FLAGS.params_cache
  if path and os.path.exists(path):
    with np.load(path) as cached:
      if str(cached["signature"]) == signature:
        log(f"loaded the trained weights from {path}")
        return {k: cached[k] for k in cached.files if k != "signature"}
    log(f"{path} was written with other training flags: retraining")
  start = time.time()
  params = train(
    train_x,
    train_y,
    eps=FLAGS.eps,
    steps=FLAGS.train_steps,
    batch=FLAGS.train_batch,
    learning_rate=FLAGS.learning_rate,
    seed=FLAGS.seed,
    log=log,
  )
  log(f"trained in {time.time() - start:.0f} s")
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, signature=np.asarray(signature), **params)
  return params


# ---------------------------------------------------------------------------- torch port


def torch_model(params: dict[str, np.ndarray], levels: int = 0):
  """The same network in torch (NCHW input), ``levels > 0``: behind the quantiser."""
  import torch
  from torch import nn

  class TinyNet(nn.Module):
    """conv 3x3x8 + ReLU, conv 3x3x16 stride 2 + ReLU, flatten (C, H, W), dense 10."""

    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(CHANNELS, HIDDEN1, 3, stride=1, padding=1)
      self.conv2 = nn.Conv2d(HIDDEN1, HIDDEN2, 3, stride=2, padding=1)
      self.dense = nn.Linear(FEATURE_HW * FEATURE_HW * HIDDEN2, CLASSES)
      self.levels = levels

    def forward(self, x):
      if self.levels:
        # torch.round's derivative is 0: the input gradient is exactly zero, as in JAX.
        x = torch.round(x * self.levels) / self.levels
      h = torch.relu(self.conv1(x))
      h = torch.relu(self.conv2(h))
      return self.dense(torch.flatten(h, 1))

  model = TinyNet()
  # HWIO -> OIHW; the dense rows from the NHWC flatten order (h, w, c) to NCHW (c, h, w).
  dense = params["dense_w"].reshape(FEATURE_HW, FEATURE_HW, HIDDEN2, CLASSES)
  dense = dense.transpose(3, 2, 0, 1).reshape(CLASSES, -1)
  state = {
    "conv1.weight": params["conv1_w"].transpose(3, 2, 0, 1),
    "conv1.bias": params["conv1_b"],
    "conv2.weight": params["conv2_w"].transpose(3, 2, 0, 1),
    "conv2.bias": params["conv2_b"],
    "dense.weight": dense,
    "dense.bias": params["dense_b"],
  }
  model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()})
  return model.eval()


def to_nchw(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# ------------------------------------------------------------------------------ the runs


class _Capture(py_logging.Handler):
  """Keeps the reference's log records (per-stage robust accuracy, warnings)."""

  def __init__(self, echo: bool):
    super().__init__(py_logging.DEBUG)
    self.records: list[py_logging.LogRecord] = []
    self.echo = echo

  def emit(self, record):
    self.records.append(record)
    if self.echo:
      print(f"  [reference] {record.getMessage()}", flush=True)


_STAGE = re.compile(r"robust accuracy after (\S+): ([\d.]+)% \(total time ([\d.]+) s\)")


def run_reference(
  model,
  x: np.ndarray,
  y: np.ndarray,
  *,
  attacks: Sequence[str] | None,
  eps: float,
  seed: int,
  square_queries: int,
  batch_size: int,
) -> dict[str, Any]:
  """pyautoattack ``version='standard'``, or its constants with only ``attacks`` run."""
  import torch
  from pyautoattack import AutoAttack

  logger = py_logging.getLogger("auto-attack")
  logger.setLevel(py_logging.DEBUG)
  logger.propagate = False
  capture = _Capture(FLAGS.verbose)
  logger.addHandler(capture)
  try:
    adversary = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=seed, device="cpu")
    adversary.square.n_queries = square_queries  # _set_version put 5000 there
    if attacks is not None:  # as the reference's run_standard_evaluation_individual
      adversary.attacks_to_run = list(attacks)
    x_t, y_t = torch.from_numpy(to_nchw(x)), torch.from_numpy(y.astype(np.int64))
    torch.manual_seed(seed)
    start = time.time()
    x_adv, y_adv = adversary.run_standard_evaluation(x_t, y_t, batch_size=batch_size)
    elapsed = time.time() - start
  finally:
    logger.removeHandler(capture)
  x_adv = x_adv.numpy().transpose(0, 2, 3, 1)
  delta = np.abs(x_adv - x).reshape(len(x), -1).max(1)
  per_attack, stage_end = {}, {}
  for record in capture.records:
    match = _STAGE.search(record.getMessage())
    if match:  # logged with 2 decimals: back to a multiple of 1/N
      name = match.group(1).lower()
      per_attack[name] = round(float(match.group(2)) / 100 * len(x)) / len(x)
      stage_end[name] = float(match.group(3))
  times, previous = {}, 0.0
  for name, end in stage_end.items():
    times[name], previous = end - previous, end
  warnings = sorted({r.getMessage() for r in capture.records if r.levelno >= py_logging.WARNING})
  flat = x_adv.reshape(len(x), -1)
  outside = (delta > eps + 1e-6) | (flat < 0).any(1) | (flat > 1).any(1)
  return {
    "robust": (y_adv.numpy() == y),
    "per_attack": per_attack,
    "times": times,
    "time": elapsed,
    "warnings": warnings,
    "max_linf": float(delta.max()),
    "outside_threat_model": int(outside.sum()),
  }


def run_agad(
  logits_fn,
  x: np.ndarray,
  y: np.ndarray,
  *,
  attacks: Sequence[str] | None,
  eps: float,
  seed: int,
  square_queries: int,
  batch_size: int,
) -> dict[str, Any]:
  """agad's autoattack: ``version='standard'`` or ``'custom'`` with ``attacks``."""
  import jax
  from agad.evaluation import autoattack

  start = time.time()
  result = autoattack(
    logits_fn,
    x,
    y,
    jax.random.key(seed),
    eps=eps,
    norm="linf",
    version="standard" if attacks is None else "custom",
    attacks=attacks,
    batch_size=batch_size,
    square_queries=square_queries,
    verbose=FLAGS.verbose,
  )
  elapsed = time.time() - start
  delta = np.abs(result["adversarial"] - x).reshape(len(x), -1).max(1)
  return {
    "robust": np.asarray(result["robust"]),
    "per_attack": dict(result["per_attack"]),
    "times": dict(result["times"]),
    "time": elapsed,
    "warnings": list(result["flags"]),
    "max_linf": float(delta.max()),
  }


# -------------------------------------------------------------------- component checks


def component_checks(
  model,
  logits_fn,
  x: np.ndarray,
  y: np.ndarray,
  *,
  eps: float,
  seed: int,
  log: Callable[[str], None],
) -> tuple[list[tuple[str, str, bool | None]], dict]:
  """Deterministic checks of the building blocks against the reference's own code.

  Returns ``[(check, result, ok)]`` (``ok`` None: reported, not enforced) and raw numbers.
  Exact checks: the DLR and targeted-DLR losses, APGD's checkpoints, Square's p schedule
  and square sides, FAB's L-inf projection. Reported: APGD-CE and APGD-T (first target)
  run by both from the same start point, whose trajectories agree up to float rounding
  (sign steps flip on gradient components at rounding level, so they may part); this
  exercises the initial step 2 eps, momentum 0.75, the step-halving rule and rho.
  """
  import jax
  import jax.numpy as jnp
  import torch
  from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
  from pyautoattack.fab_projections import projection_linf
  from pyautoattack.square import SquareAttack

  from agad.attacks.apgd import apgd_attack, apgd_checkpoints
  from agad.attacks.dlr import dlr, dlr_targeted, ranked_targets
  from agad.attacks.fab import project_linf_hyperplane_box
  from agad.attacks.square import square_p, square_sizes

  rng = np.random.default_rng(seed)
  checks: list[tuple[str, str, bool | None]] = []
  raw: dict[str, Any] = {}

  # DLR losses on random logits (with a few ties between the top classes).
  logits = rng.normal(size=(512, CLASSES)).astype(np.float32) * 3
  logits[:16, 1] = logits[:16, 0]
  labels = rng.integers(0, CLASSES, 512)
  ranked = np.asarray(ranked_targets(jnp.asarray(logits), CLASSES - 1))
  targets = ranked[np.arange(512), rng.integers(0, CLASSES - 1, 512)]
  apgd_ref = APGDAttack_targeted(model, n_iter=100, eps=eps, device="cpu")
  apgd_ref.y_target = torch.from_numpy(targets)
  logits_t, labels_t = torch.from_numpy(logits), torch.from_numpy(labels)
  for name, ours, theirs in (
    (
      "DLR loss",
      dlr(jnp.asarray(logits), jnp.asarray(labels)),
      APGDAttack(model, eps=eps, device="cpu").dlr_loss(logits_t, labels_t),
    ),
    (
      "targeted DLR loss",
      dlr_targeted(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(targets)),
      apgd_ref.dlr_loss_targeted(logits_t, labels_t),
    ),
  ):
    diff = float(np.abs(np.asarray(ours) - theirs.numpy()).max())
    checks.append((name, f"max |diff| {diff:.1e} on 512 random logit rows", diff < 1e-5))
  # Target order: the reference's sort(...)[1][:, -k] for k = 2..10.
  order = torch.from_numpy(logits[16:]).sort(dim=1)[1].numpy()
  same = np.mean([np.array_equal(order[:, -(j + 2)], ranked[16:, j]) for j in range(CLASSES - 1)])
  checks.append(
    ("target order", f"{same:.0%} of the 9 target columns equal (ties left out)", same == 1.0)
  )

  # APGD checkpoints from the reference's constants and loop rule.
  k, position, points = apgd_ref.n_iter_2, 0, [0]
  for i in range(apgd_ref.n_iter):
    if i + 1 - position == k:
      position, k = i + 1, max(k - apgd_ref.size_decr, apgd_ref.n_iter_min)
      points.append(position)
  ours_points = apgd_checkpoints(100)
  checks.append(
    ("APGD checkpoints", f"reference {points}, agad {ours_points}", points == ours_points)
  )

  # Square: p schedule and square sides over the 5000 queries, without rescaling.
  square_ref = SquareAttack(
    model, p_init=0.8, n_queries=5000, eps=eps, resc_schedule=False, device="cpu"
  )
  p_bad = sum(square_ref.p_selection(i) != square_p(i, 0.8, 5000, False) for i in range(5000))
  sides_ref = [
    min(max(int(round(math.sqrt(square_ref.p_selection(i) * HEIGHT * WIDTH))), 1), HEIGHT)
    for i in range(5000)
  ]
  side_bad = int(np.sum(np.asarray(sides_ref) != square_sizes(HEIGHT, WIDTH, 5000, 0.8, False)))
  checks.append(
    (
      "Square p / sides",
      f"{p_bad} / {side_bad} of 5000 queries differ",
      p_bad == 0 and side_bad == 0,
    )
  )

  # FAB's L-inf projection onto {w.x = b} within the box, reachable or not.
  worst = 0.0
  for scale in (0.1, 1.0, 10.0, 100.0):
    t = rng.uniform(0, 1, (128, HEIGHT * WIDTH)).astype(np.float32)
    w = rng.normal(size=t.shape).astype(np.float32) * (rng.uniform(size=t.shape) > 0.2)
    b = ((w * t).sum(1) + rng.normal(size=128) * scale).astype(np.float32)
    theirs = projection_linf(torch.from_numpy(t), torch.from_numpy(w), torch.from_numpy(b))
    ours = project_linf_hyperplane_box(jnp.asarray(t), jnp.asarray(w), jnp.asarray(b))
    worst = max(worst, float(np.abs(np.asarray(ours) - theirs.numpy()).max()))
  checks.append(
    ("FAB L-inf projection", f"max |diff| {worst:.1e} on 512 random hyperplanes", worst < 1e-5)
  )

  # APGD from one shared start point (the points the model classifies correctly).
  clean_pred = np.asarray(logits_fn(jnp.asarray(x))).argmax(-1)
  keep = clean_pred == y
  xs, ys = x[keep], y[keep]
  u = rng.uniform(-1, 1, xs.shape).astype(np.float32)
  start = np.clip(
    xs + eps * u / np.abs(u).reshape(len(u), -1).max(1)[:, None, None, None], 0, 1
  ).astype(np.float32)
  top2 = np.asarray(ranked_targets(logits_fn(jnp.asarray(xs)), 1))[:, 0]
  for name, loss in (("APGD-CE shared start", "ce"), ("APGD-T shared start", "dlr-targeted")):
    if loss == "ce":
      ref_attack = APGDAttack(model, n_iter=100, eps=eps, loss="ce", device="cpu")
    else:
      ref_attack = APGDAttack_targeted(model, n_iter=100, eps=eps, device="cpu")
      ref_attack.y_target = torch.from_numpy(top2.astype(np.int64))
    x_t = torch.from_numpy(to_nchw(xs))
    ref_attack.init_hyperparam(x_t)
    _, ref_acc, ref_loss, _ = ref_attack.attack_single_run(
      x_t, torch.from_numpy(ys.astype(np.int64)), x_init=torch.from_numpy(to_nchw(start))
    )
    ours = apgd_attack(
      logits_fn,
      xs,
      ys,
      jax.random.key(seed),
      eps=eps,
      steps=100,
      loss=loss,
      targets=top2 if loss != "ce" else None,
      x_init=start,
    )
    ref_robust, ref_loss = ref_acc.numpy().astype(bool), ref_loss.numpy()
    our_robust, our_loss = np.asarray(ours.robust), np.asarray(ours.loss)
    close = np.abs(our_loss - ref_loss) <= 1e-3 * np.maximum(1.0, np.abs(ref_loss))
    raw[loss] = {
      "ref_robust": ref_robust,
      "agad_robust": our_robust,
      "ref_loss": ref_loss,
      "agad_loss": our_loss,
    }
    agree = np.mean(ref_robust == our_robust)
    checks.append(
      (
        name,
        f"{len(xs)} points: robust {ref_robust.mean():.2%} ref vs "
        f"{our_robust.mean():.2%} agad, verdicts agree on {agree:.1%}, "
        f"best loss within 0.1% on {close.mean():.1%}",
        None,
      )
    )
  for name, result, ok in checks:
    log(f"  {name}: {result} [{'ok' if ok else 'MISMATCH' if ok is False else 'reported'}]")
  return checks, raw


# ------------------------------------------------------------------------------- timing


def _limit_threads(n: int) -> None:
  """Both frameworks on at most ``n`` CPUs: call before JAX or torch initialise.

  Pins the process to the first ``n`` CPUs it may use (JAX sizes its CPU thread pool from
  the affinity mask; torch gets ``set_num_threads(n)`` in ``main``); ``n = 1`` also turns
  off XLA's multi-threaded Eigen kernels.
  """
  cpus = sorted(os.sched_getaffinity(0))
  if n > len(cpus):
    raise app.UsageError(f"--threads={n}: this process may use only {len(cpus)} CPUs {cpus}")
  os.sched_setaffinity(0, cpus[:n])
  if n == 1:
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    ).strip()


def timing(
  model,
  logits_fn,
  x: np.ndarray,
  y: np.ndarray,
  common: dict[str, Any],
  results: dict[str, Any],
  log: Callable[[str], None],
) -> int:
  """``--timing``: each attack alone, reference and agad alternately (ABBA), same inputs.

  Per attack and implementation: wall times of every call, robust accuracy, per-example
  agreement with the reference, and the steps agad traced (compiled) after its first call.
  """
  import torch

  try:
    from agad.attacks import batching as runner
  except ImportError:  # an --agad_root from before the module was renamed
    from agad.attacks import runner

  results["timing"] = {
    "threads": {
      "torch": torch.get_num_threads(),
      "affinity": sorted(os.sched_getaffinity(0)),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
    },
    "attacks": {},
  }
  log(
    f"timing: threads torch {torch.get_num_threads()}, CPU affinity "
    f"{sorted(os.sched_getaffinity(0))}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
    f"repeats {FLAGS.repeats}, agad from {os.path.dirname(os.path.dirname(runner.__file__))}"
  )
  rows = []
  for name in [a for a in ATTACK_ORDER if a in FLAGS.attacks]:
    ref_times, agad_times, ref_robust, agad_robust, retraced = [], [], [], [], 0
    for rep in range(max(1, FLAGS.repeats)):
      order = ("ref", "agad") if rep % 2 == 0 else ("agad", "ref")
      for who in order:
        if who == "ref":
          out = run_reference(model, x, y, attacks=[name], **common)
          ref_times.append(out["time"])
          ref_robust.append(out["robust"])
        else:
          before = dict(runner.TRACE_COUNTS)
          out = run_agad(logits_fn, x, y, attacks=[name], **common)
          if agad_times:
            retraced += sum(v - before.get(k, 0) for k, v in runner.TRACE_COUNTS.items())
          agad_times.append(out["time"])
          agad_robust.append(out["robust"])
        log(f"  {name} {who} run: {out['time']:.1f} s, robust {out['robust'].mean():.2%}")
    ref_s = float(np.median(ref_times))
    warm = agad_times[1:] or agad_times
    row = dict(
      name=name,
      ref=float(ref_robust[0].mean()),
      agad=float(agad_robust[0].mean()),
      agree=float(np.mean(ref_robust[0] == agad_robust[0])),
      ref_s=ref_s,
      agad_cold_s=agad_times[0],
      agad_warm_s=float(np.median(warm)),
      ref_times=ref_times,
      agad_times=agad_times,
      retraced_after_first=retraced,
      agad_deterministic=all(np.array_equal(r, agad_robust[0]) for r in agad_robust),
    )
    rows.append(row)
    results["timing"]["attacks"][name] = row
  log("")
  log(
    f"=== timing: N={len(x)}, eps={FLAGS.eps}, square_queries={FLAGS.square_queries}, "
    f"batch {FLAGS.batch_size}, threads {FLAGS.threads or 'default'} ==="
  )
  header = (
    f"{'attack':<8} {'ref RA':>7} {'agad RA':>7} {'agree':>6} {'ref s':>7} "
    f"{'agad cold':>9} {'agad warm':>9} {'warm/ref':>8} {'retraced':>8}"
  )
  log(header)
  log("-" * len(header))
  for r in rows:
    log(
      f"{r['name']:<8} {100 * r['ref']:6.2f}% {100 * r['agad']:6.2f}% {100 * r['agree']:5.1f}% "
      f"{r['ref_s']:7.1f} {r['agad_cold_s']:9.1f} {r['agad_warm_s']:9.1f} "
      f"{r['agad_warm_s'] / max(r['ref_s'], 1e-9):8.2f} {r['retraced_after_first']:8d}"
    )
  if FLAGS.output:
    _write_json(results, FLAGS.output)
    log(f"wrote {FLAGS.output}")
  return 0


def _write_json(results: dict[str, Any], path: str) -> None:
  def plain(value):
    if isinstance(value, np.ndarray):
      return value.tolist()
    if isinstance(value, dict):
      return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
      return [plain(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
      return value.item()
    return value

  with open(path, "w") as f:
    json.dump(plain(results), f, indent=1)


# ------------------------------------------------------------------------------- report


def _pct(v: float | None) -> str:
  return "    n/a" if v is None else f"{100 * v:6.2f}%"


def _table(rows: list[dict[str, Any]], first: str) -> str:
  header = (
    f"{first:<14} {'ref RA':>8} {'agad RA':>8} {'diff pp':>8} {'agree':>8} "
    f"{'ref s':>8} {'agad s':>8}"
  )
  lines = [header, "-" * len(header)]
  for row in rows:
    diff = (
      f"{100 * (row['agad'] - row['ref']):+8.2f}"
      if row["ref"] is not None and row["agad"] is not None
      else f"{'n/a':>8}"
    )
    agree = f"{100 * row['agree']:7.1f}%" if row.get("agree") is not None else f"{'':>8}"
    ref_s = f"{row['ref_s']:8.1f}" if row.get("ref_s") is not None else f"{'n/a':>8}"
    agad_s = f"{row['agad_s']:8.1f}" if row.get("agad_s") is not None else f"{'n/a':>8}"
    lines.append(
      f"{row['name']:<14} {_pct(row['ref']):>8} {_pct(row['agad']):>8} {diff} "
      f"{agree} {ref_s} {agad_s}"
    )
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # A script in tools/ (not a package module): agad comes from this checkout or --agad_root.
  checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, os.path.abspath(FLAGS.agad_root or checkout))
  if FLAGS.threads:
    _limit_threads(FLAGS.threads)
  import jax
  import jax.numpy as jnp
  from jax.tree_util import Partial
  import torch

  from agad.data.sources import load_dataset

  log = lambda msg: print(msg, flush=True)
  if FLAGS.threads or FLAGS.torch_threads:
    torch.set_num_threads(FLAGS.threads or FLAGS.torch_threads)
  unknown = [a for a in FLAGS.attacks if a not in ATTACK_ORDER]
  if unknown:
    raise app.UsageError(f"--attacks: unknown {unknown}; choose from {ATTACK_ORDER}")
  import pyautoattack

  log(
    f"agad parity check: torch {torch.__version__} ({torch.get_num_threads()} threads), "
    f"pyautoattack {pyautoattack.__version__}, jax {jax.__version__} "
    f"({jax.devices()[0].platform}); "
    f"N={FLAGS.n}, eps={FLAGS.eps}, square_queries={FLAGS.square_queries}, "
    f"model={'quantised (L=%d, zero gradient)' % FLAGS.levels if FLAGS.masked else 'plain'}"
  )

  splits = load_dataset(types.SimpleNamespace(name="fashion_mnist"))
  train_x, train_y = splits.train.images, splits.train.labels
  x = splits.test.images[: FLAGS.n].astype(np.float32) / 255.0
  y = splits.test.labels[: FLAGS.n].astype(np.int32)

  params_np = trained_params(train_x, train_y, log)
  params = {k: jnp.asarray(v) for k, v in params_np.items()}
  plain_fn = Partial(jax_logits, params)
  pgd_x = _pgd(
    params,
    jnp.asarray(x),
    jnp.asarray(y),
    jax.random.key(FLAGS.seed + 1),
    FLAGS.eps,
    20,
    FLAGS.eps / 8,
  )
  log(
    f"plain model on the {len(x)} images: clean accuracy "
    f"{float(jnp.mean(plain_fn(jnp.asarray(x)).argmax(-1) == y)):.2%}, PGD-20 accuracy "
    f"{float(jnp.mean(plain_fn(pgd_x).argmax(-1) == y)):.2%}"
  )

  # The two ports must compute the same function (clean and quantised).
  worst = 0.0
  with torch.no_grad():
    for levels in (0, FLAGS.levels):
      fn = plain_fn if not levels else Partial(jax_quantised_logits, params, jnp.float32(levels))
      ours = np.asarray(fn(jnp.asarray(x)))
      theirs = torch_model(params_np, levels)(torch.from_numpy(to_nchw(x))).numpy()
      diff = float(np.abs(ours - theirs).max())
      log(
        f"logit check ({'quantised' if levels else 'plain'}): max |jax - torch| = {diff:.2e}, "
        f"argmax agreement {np.mean(ours.argmax(-1) == theirs.argmax(-1)):.2%}"
      )
      worst = max(worst, diff)
  if worst > FLAGS.logit_tolerance:
    log(f"FAIL: the ports disagree ({worst:.2e} > {FLAGS.logit_tolerance:.0e})")
    return 2

  levels = FLAGS.levels if FLAGS.masked else 0
  logits_fn = Partial(jax_quantised_logits, params, jnp.float32(levels)) if levels else plain_fn
  model = torch_model(params_np, levels)
  clean = float(np.mean(np.asarray(logits_fn(jnp.asarray(x))).argmax(-1) == y))
  log(f"evaluated model: clean accuracy {clean:.2%}")
  common = dict(
    eps=FLAGS.eps, seed=FLAGS.seed, square_queries=FLAGS.square_queries, batch_size=FLAGS.batch_size
  )
  results: dict[str, Any] = {
    "flags": {
      k: FLAGS[k].value
      for k in (
        "n",
        "eps",
        "square_queries",
        "masked",
        "levels",
        "seed",
        "train_steps",
        "batch_size",
      )
    },
    "clean_accuracy": clean,
    "logit_max_abs_diff": worst,
    "individual": {},
  }

  if FLAGS.timing:
    return timing(model, logits_fn, x, y, common, results, log)

  component_failures = []
  if FLAGS.components:
    log("component checks against the reference code:")
    start = time.time()
    checks, raw = component_checks(model, logits_fn, x, y, eps=FLAGS.eps, seed=FLAGS.seed, log=log)
    log(f"  ({time.time() - start:.0f} s)")
    component_failures = [name for name, _, ok in checks if ok is False]
    results["components"] = {"checks": checks, "apgd_shared_start": raw}

  rows = []
  for name in [a for a in ATTACK_ORDER if a in FLAGS.attacks]:
    log(f"running {name} alone: reference ...")
    ref = run_reference(model, x, y, attacks=[name], **common)
    log(f"  reference {name}: {ref['robust'].mean():.2%} in {ref['time']:.1f} s; agad ...")
    ours = run_agad(logits_fn, x, y, attacks=[name], **common)
    log(f"  agad {name}: {ours['robust'].mean():.2%} in {ours['time']:.1f} s")
    rows.append(
      dict(
        name=name,
        ref=float(ref["robust"].mean()),
        agad=float(ours["robust"].mean()),
        agree=float(np.mean(ref["robust"] == ours["robust"])),
        ref_s=ref["time"],
        agad_s=ours["time"],
      )
    )
    results["individual"][name] = {"reference": ref, "agad": ours}

  standard_rows, final = [], None
  if FLAGS.standard:
    log("running version='standard': reference ...")
    ref = run_reference(model, x, y, attacks=None, **common)
    log(f"  reference standard: {ref['robust'].mean():.2%} in {ref['time']:.1f} s; agad ...")
    ours = run_agad(logits_fn, x, y, attacks=None, **common)
    log(f"  agad standard: {ours['robust'].mean():.2%} in {ours['time']:.1f} s")
    for name in ATTACK_ORDER:
      standard_rows.append(
        dict(
          name=f"after {name}",
          ref=ref["per_attack"].get(name),
          agad=ours["per_attack"].get(name),
          ref_s=ref["times"].get(name),
          agad_s=ours["times"].get(name),
        )
      )
    final = dict(
      name="AA standard",
      ref=float(ref["robust"].mean()),
      agad=float(ours["robust"].mean()),
      agree=float(np.mean(ref["robust"] == ours["robust"])),
      ref_s=ref["time"],
      agad_s=ours["time"],
    )
    standard_rows.append(final)
    results["standard"] = {"reference": ref, "agad": ours}

  log("")
  log(
    f"=== parity: N={len(x)}, eps={FLAGS.eps}, model="
    f"{'quantised L=%d (masked gradients)' % levels if levels else 'plain'}, clean {clean:.2%}, "
    f"square_queries={FLAGS.square_queries} ==="
  )
  if rows:
    log("attacks alone (each from the clean images; RA = robust accuracy over all N):")
    log(_table(rows, "attack"))
  if standard_rows:
    log("version='standard' (per stage; times are per stage, agad's include compilation):")
    log(_table(standard_rows, "stage"))
  for label, run in (
    ("reference", results.get("standard", {}).get("reference")),
    ("agad", results.get("standard", {}).get("agad")),
  ):
    if run is not None:
      extra = (
        f", points outside the threat model: {run['outside_threat_model']}"
        if "outside_threat_model" in run
        else ""
      )
      log(f"{label}: max L-inf perturbation {run['max_linf']:.5f}{extra}")
      for warning in run["warnings"]:
        log(f"  {label} warning: {warning[:300]}")

  status = 0
  if final is not None:
    gap = 100 * abs(final["agad"] - final["ref"])
    verdict = "PASS" if gap <= FLAGS.tolerance_pp else "FAIL"
    log(
      f"{verdict}: |AA_ref - AA_agad| = {gap:.2f} pp (tolerance {FLAGS.tolerance_pp} pp; "
      f"one example = {100 / len(x):.2f} pp)"
    )
    status = 0 if verdict == "PASS" else 1
  if component_failures:
    log(f"FAIL: component checks {component_failures} disagree with the reference")
    status = 1
  if FLAGS.output:
    _write_json(results, FLAGS.output)
    log(f"wrote {FLAGS.output}")
  return status


if __name__ == "__main__":
  app.run(main)
