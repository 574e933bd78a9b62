"""Site names of a backbone: listing, index aliases and plug-in validation.

A site (see :func:`agad.models.layers.site`) is named by where it sits, e.g. ``stem``,
``stage3.unit4``, ``stage3.unit4.branch``, ``stage2.pre_pool``, ``features``. Code that
targets "the last unit of stage 3" whatever the depth writes an alias with a bracketed
unit index, negative from the end or positive from the start:

    resolve_site(wrn34_10, 'stage3.unit[-1].branch')   # -> 'stage3.unit4.branch'
    resolve_site(resnet18, 'stage3.unit[-1]')          # -> 'stage3.unit1'

Every name is checked against :func:`site_names` of the built model, so a misspelt site
raises (listing the valid ones) instead of being silently ignored, which is what the
model itself does with a plug-in whose key names no site.
"""

import difflib
import functools
import re
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

# stage{s}.unit[{i}]{rest}: s 1-indexed, i a python-style index into the stage's units.
_UNIT_ALIAS = re.compile(r"^stage(\d+)\.unit\[([+-]?\d+)\](.*)$")


def _default_shape(model: nn.Module) -> tuple[int, int, int]:
  # Site names do not depend on the input size; 32x32 is big enough for every backbone
  # here (VGG's five pools, SmallCNN's valid convs), the channels follow the mean.
  return (32, 32, len(getattr(model, "mean", (0.0,)) or (0.0,)))


def site_names(model: nn.Module, input_shape: Sequence[int] | None = None) -> tuple[str, ...]:
  """Every site of ``model``, in the order the forward pass first reaches them.

  Traces ``model.init`` abstractly (``jax.eval_shape``, no compute) on a batch of one
  ``input_shape`` = ``(H, W, C)`` example (``None``: 32x32 with ``len(model.mean)``
  channels) and collects the leaf names of the ``'intermediates'`` collection at any
  depth. Plug-ins are dropped for the trace (sites do not depend on them; a plug-in that
  sows into ``'intermediates'`` would otherwise add names). Order: forward-pass order of
  first appearance, except that a child module's sites are listed together at its first
  one, e.g. ResNet-18 gives ``('stem', 'stage1.unit0.branch', 'stage1.unit0',
  'stage1.unit1.branch', 'stage1.unit1', 'stage1', ..., 'features', 'embedding')``.
  Results are cached per (model without plug-ins, input_shape).
  """
  shape = _default_shape(model) if input_shape is None else tuple(int(d) for d in input_shape)
  if len(shape) != 3:
    raise ValueError(
      f"input_shape {input_shape!r} must be one example's (H, W, C), "
      f"without the batch axis, e.g. (32, 32, 3)"
    )
  if getattr(model, "plugins", None) is not None:
    model = model.clone(plugins=None)
  try:
    hash(model)
  except TypeError:  # an unhashable attribute (e.g. a norm factory): trace uncached
    return _site_names.__wrapped__(model, shape)
  return _site_names(model, shape)


@functools.lru_cache(maxsize=64)
def _site_names(model: nn.Module, shape: tuple[int, ...]) -> tuple[str, ...]:
  names = []

  def trace(x):
    variables = model.init(jax.random.key(0), x, train=False, mutable=True)
    # Read at trace time: the returned tree would come back key-sorted from eval_shape.
    for path in traverse_util.flatten_dict(variables.get("intermediates", {})):
      if path[-1] not in names:
        names.append(path[-1])

  jax.eval_shape(trace, jax.ShapeDtypeStruct((1,) + shape, jnp.float32))
  return tuple(names)


def _hint(name: str, valid: Sequence[str]) -> str:
  close = difflib.get_close_matches(name, valid, n=3)
  return f" (did you mean {', '.join(map(repr, close))}?)" if close else ""


def _invalid(name: str, valid: Sequence[str], why: str) -> ValueError:
  return ValueError(
    f"site {name!r} {why}{_hint(name, valid)}; valid site names: "
    f"{', '.join(valid)}; "
    "unit aliases: stage{s}.unit[i] / stage{s}.unit[i].branch with i in "
    "[-n, n) for a stage of n residual units"
  )


def resolve_site(model: nn.Module, name: str, input_shape: Sequence[int] | None = None) -> str:
  """The site ``name`` names in ``model``, with unit aliases resolved.

  ``stage{s}.unit[i]{rest}`` -> ``stage{s}.unit{j}{rest}``, ``j = i`` for ``i >= 0`` and
  ``n + i`` for ``i < 0``, where ``n = model.stage_sizes[s - 1]``; other names pass
  through. The result must be one of ``site_names(model, input_shape)``, else ValueError
  listing them (also for a stage or index out of range, or a unit alias on a backbone
  without residual units). ``input_shape``: one example's ``(H, W, C)``, see
  :func:`site_names`.
  """
  valid = site_names(model, input_shape)
  resolved = name
  match = _UNIT_ALIAS.match(name)
  if match:
    s, i, rest = int(match[1]), int(match[2]), match[3]
    sizes = tuple(model.stage_sizes)
    if not 1 <= s <= len(sizes):
      raise _invalid(name, valid, f"has stage {s}, but the model has stages 1..{len(sizes)}")
    n = sizes[s - 1]
    if not -n <= i < n:
      raise _invalid(
        name, valid, f"has unit index {i}, but stage {s} has {n} units (index in [{-n}, {n}))"
      )
    resolved = f"stage{s}.unit{i % n}{rest}"
  if resolved not in valid:
    why = "is not a site of this model" + (f" (resolved to {resolved!r})" if match else "")
    raise _invalid(name, valid, why)
  return resolved


def resolve_plugins(
  model: nn.Module,
  plugins: Mapping[str, Callable[[], nn.Module]] | None,
  input_shape: Sequence[int] | None = None,
) -> dict:
  """``plugins`` with every key resolved by :func:`resolve_site`; a new dict.

  Raises ValueError naming every key that is no site of ``model`` (with the valid
  names), or two keys that resolve to the same site. Resolve before building the model
  with the plug-ins: the model ignores a key that names no site.
  """
  plugins = dict(plugins or {})
  valid = site_names(model, input_shape)
  resolved, bad = {}, []
  for key, factory in plugins.items():
    try:
      site = resolve_site(model, key, input_shape)
    except ValueError:
      bad.append(key)
      continue
    if site in resolved:
      raise ValueError(
        f"plug-in keys {resolved[site][0]!r} and {key!r} both name site {site!r}; keep one of them"
      )
    resolved[site] = (key, factory)
  if bad:
    named = ", ".join(repr(key) + _hint(key, valid) for key in bad)
    raise ValueError(
      f"plug-in site(s) {named} not found in "
      f"{type(model).__name__}; valid site names: {', '.join(valid)}; unit "
      "aliases: stage{s}.unit[i] / stage{s}.unit[i].branch"
    )
  return {site: factory for site, (_, factory) in resolved.items()}
