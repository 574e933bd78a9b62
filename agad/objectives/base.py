"""The Objective: adversarial training as a loss-and-state transform.

An ``Objective`` is a bundle of pure functions, in the spirit of optax's
``GradientTransformation``:

    aux_state = init(key, variables, batch)
    adv       = generate(params, model_state, aux_state, batch, key, step)
    loss, (model_state, aux_state, metrics, passes) = loss(params, model_state, aux_state,
                                                           batch, adv, key, step)

``generate`` runs outside ``value_and_grad`` and its output is gradient-stopped by the
train step; ``loss`` is differentiated w.r.t. ``params``. ``passes`` is the loss's own
train-mode forward passes, ``{name: ModelOutput(logits, model_state, aux, taps)}``
(``"clean"``, ``"adv"``, ...; every site of the model in ``taps``), so a transform adds
terms on them without a second forward pass (:func:`add_terms`); under ``jit`` the
unused taps cost nothing (dead code). A transform
``Objective -> Objective`` may wrap either function (AWP wraps ``loss`` and reuses the
same ``adv``; FSR/AGKD-BML/AGAIN extend ``generate``). The training loop only ever sees
this interface, so new objectives and defenses never touch it.

``batch`` is a dict with ``image`` ``[B, H, W, C]`` float32 in [0, 1] and ``label``
``[B]`` int32. ``model_state`` holds the non-parameter collections (``batch_stats``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from agad.attacks import losses as attack_losses

PyTree = Any


class BNPolicy(NamedTuple):
  """Which forward passes use which BatchNorm mode (documented per objective).

  attack: ``"eval"`` (running statistics) or ``"batch"`` (statistics of the attacked
    batch, running averages left untouched) for the forward passes inside the attack.
  update: which training forward passes update the running statistics, in words
    (e.g. ``"adversarial"``, ``"clean+adversarial (two passes)"``).
  """

  attack: str = "eval"
  update: str = "adversarial"


class Objective(NamedTuple):
  name: str
  init: Callable[..., PyTree]
  generate: Callable[..., PyTree]
  loss: Callable[..., tuple[jax.Array, tuple[PyTree, PyTree, dict]]]
  bn_policy: BNPolicy
  # (model, variables) -> loss_fn(x, labels) -> [B] an informed attacker maximises, or a
  # dict {variant: loss_fn} of several (variant "" is reported as adaptive-pgd-k, the others
  # as adaptive-<variant>-pgd-k); None means "cross-entropy on the logits" is already the
  # adaptive attack.
  adaptive_loss: Callable[..., Callable] | None = None
  # Host-side inputs loaded once per launch and passed into the jitted step, never
  # checkpointed (a frozen teacher, a class-indexed image bank): ``frozen(splits) ->
  # (tree, record)``; ``tree`` reaches ``generate``/``loss`` as ``aux_state[FROZEN]``,
  # ``record`` (JSON: the teacher's workdir, step and params hash) goes into every
  # checkpoint's metadata and a resume with a different record is refused. A record's
  # ``schedule_start_step`` (int) makes the trainer read the lr schedule at that step + the
  # step (ATAT's code continues its teacher's step counter).
  frozen: Callable[[Any], tuple[PyTree, dict]] | None = None
  # (model, variables) -> fn(images, labels, key, eps_values) -> a per-example quantity of the
  # defense against attack strength, which ``launch.evaluate --preset=ladder`` plots: a dict
  # with ``name``, ``xlabel``, ``ylabel``, ``x [n]`` (the eps values), ``y [n, B]`` and
  # ``summary`` {str: float} (AFA: its fusion weight, paper Fig. 6). None: nothing to plot.
  analysis: Callable[..., Callable] | None = None


FROZEN = "frozen"  # aux_state key under which the step passes an objective's frozen inputs


class LossAux(NamedTuple):
  """The auxiliary output of ``Objective.loss``."""

  model_state: PyTree
  aux_state: PyTree
  metrics: dict
  passes: dict  # {pass name: ModelOutput}


def adaptive_variants(adaptive_loss) -> dict[str, Callable] | None:
  """An objective's adaptive loss (built for one model) as ``{variant: loss}``; a single
  callable is variant ``""``."""
  if adaptive_loss is None or isinstance(adaptive_loss, Mapping):
    return adaptive_loss
  return {"": adaptive_loss}


class ModelOutput(NamedTuple):
  logits: jax.Array  # [B, K] float32
  model_state: PyTree  # updated (train mode) or unchanged non-param collections
  aux: dict  # the 'aux' collection sown by plug-ins (auxiliary logits)
  taps: dict = {}  # {site name: value} requested with forward(..., taps=...)


BN_MODES = ("train", "eval", "batch")
PLUGIN_RNG = "plugins"  # the rng stream plug-ins draw from in training passes
ALL_TAPS = True


def _collect_taps(intermediates: Any, taps) -> dict:
  """``{site: value}`` from a sown 'intermediates' tree (sites nest under units)."""
  found = {}
  for path, value in jax.tree_util.tree_flatten_with_path(
    intermediates, is_leaf=lambda v: isinstance(v, tuple)
  )[0]:
    name = getattr(path[-1], "key", None)
    found[name] = value[-1] if isinstance(value, tuple) else value
  if taps is ALL_TAPS:
    return found
  missing = [t for t in taps if t not in found]
  if missing:
    raise KeyError(f"taps {missing} are not sites of this model; its sites: {sorted(found)}")
  return {t: found[t] for t in taps}


def forward(
  model: nn.Module,
  params: PyTree,
  model_state: PyTree,
  x: jax.Array,
  *,
  mode: str,
  labels: jax.Array | None = None,
  norm_ctx: Any = None,
  taps: Sequence[str] | bool = (),
  rng: jax.Array | None = None,
) -> ModelOutput:
  """One forward pass with an explicit BatchNorm mode.

  mode: ``"train"`` batch statistics, running averages updated (returned);
    ``"eval"`` running averages; ``"batch"`` batch statistics, running averages
    unchanged (the update is discarded).
  taps: site names whose values to return in ``ModelOutput.taps`` (``True``: every site).
  rng: the plug-ins' rng stream (``"plugins"``) for a training pass (``train`` or
    ``batch`` mode; objectives pass a fresh key per pass and step). Eval passes are
    deterministic: the key is not passed to the model in ``"eval"`` mode.
  """
  if mode not in BN_MODES:
    raise ValueError(f"BN mode {mode!r} is not one of {BN_MODES}")
  variables = {"params": params, **model_state}
  train = mode != "eval"
  mutable = ["aux"] + (["batch_stats"] if train and "batch_stats" in model_state else [])
  if taps:
    mutable.append("intermediates")
  rngs = {PLUGIN_RNG: rng} if (rng is not None and train) else None
  logits, updated = model.apply(
    variables, x, train=train, labels=labels, norm_ctx=norm_ctx, mutable=mutable, rngs=rngs
  )
  updated = dict(updated)
  aux = updated.pop("aux", {})
  found = _collect_taps(updated.pop("intermediates", {}), taps) if taps else {}
  new_state = {**model_state, **updated} if mode == "train" else model_state
  return ModelOutput(logits.astype(jnp.float32), new_state, aux, found)


def pass_key(key: jax.Array, index: int) -> jax.Array:
  """The plug-in rng of a loss's ``index``-th training pass (fresh per pass and step)."""
  return jax.random.fold_in(jax.random.fold_in(key, _PASS_SALT), index)


_PASS_SALT = 0x504C5547  # keeps plug-in keys apart from an objective's own uses of ``key``


def slice_output(out: ModelOutput, start: int, stop: int) -> ModelOutput:
  """Rows ``start:stop`` of a pass over a concatenated batch (logits, aux and taps)."""
  cut = lambda tree: jax.tree.map(lambda a: a[start:stop], tree)
  return ModelOutput(out.logits[start:stop], out.model_state, cut(out.aux), cut(out.taps))


TermFn = Callable[..., tuple[jax.Array, dict]]


def add_terms(inner: Objective, suffix: str, term_fn: TermFn) -> Objective:
  """``inner`` with extra loss terms computed on its own passes (no new forward pass).

  ``term_fn(params, passes, batch, key, step) -> (value, metrics)``; the value is added
  to the inner loss and the metrics are merged (prefix them to avoid clashes). The name
  becomes ``f"{inner.name}+{suffix}"``.
  """

  def loss(params, model_state, aux_state, batch, adv, key, step):
    value, aux = inner.loss(params, model_state, aux_state, batch, adv, key, step)
    extra, metrics = term_fn(params, aux.passes, batch, jax.random.fold_in(key, _TERM_SALT), step)
    return value + extra, aux._replace(metrics={**aux.metrics, **metrics})

  return inner._replace(name=f"{inner.name}+{suffix}", loss=loss)


_TERM_SALT = 0x5445524D


def logits_fn_for(
  model: nn.Module,
  params: PyTree,
  model_state: PyTree,
  *,
  mode: str = "eval",
  labels: jax.Array | None = None,
  norm_ctx: Any = None,
) -> Callable[[jax.Array], jax.Array]:
  """A closure ``x -> logits`` for attacks inside a traced step (BN mode explicit)."""
  return lambda x: (
    forward(model, params, model_state, x, mode=mode, labels=labels, norm_ctx=norm_ctx).logits
  )


def cross_entropy_mean(
  logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0, smoothing: str = "all"
) -> jax.Array:
  return jnp.mean(
    attack_losses.cross_entropy(
      logits, labels, label_smoothing=label_smoothing, smoothing=smoothing
    )
  )


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))


def no_aux_state(key, variables, batch) -> PyTree:
  del key, variables, batch
  return {}
