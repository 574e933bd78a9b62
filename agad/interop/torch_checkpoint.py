"""PyTorch state dicts <-> agad variables for the reference CIFAR / MNIST architectures.

Each architecture maps agad's module names to the key names of the public PyTorch code the
published checkpoints come from (docs/pytorch.md names the files and commits read):

  smallcnn           TRADES ``models/small_cnn.py`` ``SmallCNN``: ``feature_extractor.conv1..conv4``
                     (3x3, no padding, with bias), ``classifier.fc1..fc3``.
  resnet18/34/50     kuangliu/pytorch-cifar ``models/resnet.py`` ``ResNet`` (also RobustBench's
                     ``architectures/resnet.py``): ``conv1``, ``bn1``, ``layer{s}.{i}.conv1/bn1/...``,
                     ``layer{s}.{i}.shortcut.0`` (1x1 conv) and ``.shortcut.1`` (BN), ``linear``.
  preact_resnet18    RobustBench ``PreActResNet(PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True)``
                     (Rice et al.'s ``preactresnet.py``): ``conv1``, ``layer{s}.{i}.bn1/conv1/bn2/
                     conv2``, ``layer{s}.{i}.shortcut.0``, ``bn``, ``linear``.
  wrn16_8/28_10/34_10  TRADES ``models/wideresnet.py`` ``WideResNet`` (= RobustBench's
                     ``architectures/wide_resnet.py``): ``conv1``, ``block{s}.layer.{i}.bn1/conv1/
                     bn2/conv2/convShortcut``, ``bn1``, ``fc``.

Layouts: conv weights OIHW <-> HWIO, Linear weights [out, in] <-> Dense kernels [in, out]; the
first Dense of SmallCNN reads PyTorch's NCHW flatten (``view(-1, 64 * 4 * 4)``), so its rows are
reordered to agad's NHWC flatten. BatchNorm: ``weight``/``bias`` <-> ``scale``/``bias``,
``running_mean``/``running_var`` <-> ``batch_stats`` ``mean``/``var``; agad's BatchNorm has
PyTorch's eps 1e-5 and momentum 0.1 (flax 0.9). ``num_batches_tracked`` has no agad
counterpart: it is returned with the variables and written back on export. Every conversion
is a permutation of the same float32 values, so import then export gives the input back bitwise.
"""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import traverse_util
from safetensors import safe_open

from agad import models as models_lib

ARCHS: dict[str, str] = {
  "smallcnn": "smallcnn",
  "resnet18": "resnet",
  "resnet34": "resnet",
  "resnet50": "resnet",
  "preact_resnet18": "preact",
  "wrn16_8": "wrn",
  "wrn28_10": "wrn",
  "wrn34_10": "wrn",
}
FORMATS = (".safetensors", ".pt", ".pth")
# Keys a family's checkpoints carry that its forward pass never uses: RobustBench's
# WideResNet(sub_block1=True) builds a second first block that forward() never calls.
IGNORED_PREFIXES = {"wrn": ("sub_block1.",)}
# RobustBench's wrappers normalise inside the model with these buffers ([1, C, 1, 1]).
NORM_BUFFERS = ("mu", "sigma")
# A key only one family has: names the likely --arch in a mismatch message.
_SIGNATURES = (
  ("smallcnn", "feature_extractor.conv1.weight"),
  ("wrn", "block1.layer.0.conv1.weight"),
  ("resnet", "layer1.0.conv1.weight"),
  ("preact", "layer1.0.bn1.weight"),
)
_BN = (
  ("weight", "params", "scale"),
  ("bias", "params", "bias"),
  ("running_mean", "batch_stats", "mean"),
  ("running_var", "batch_stats", "var"),
)


class CheckpointMismatch(ValueError):
  """The state dict does not fit the architecture (the message lists what and why)."""


def check_arch(arch: str) -> str:
  if arch not in ARCHS:
    raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
  return ARCHS[arch]


def template(arch: str, *, num_classes: int, image_shape) -> dict:
  """Abstract ``{'params': ..., 'batch_stats': ...}`` of agad's ``arch`` (shapes only)."""
  check_arch(arch)
  channels = int(image_shape[-1])
  model = models_lib.build_model(
    arch,
    num_classes=int(num_classes),
    mean=(0.0,) * channels,
    std=(1.0,) * channels,
    input_norm="none",
  )
  x = jax.ShapeDtypeStruct((1,) + tuple(int(d) for d in image_shape), jnp.float32)
  shapes = jax.eval_shape(lambda v: model.init(jax.random.key(0), v, train=False), x)
  return {k: shapes[k] for k in ("params", "batch_stats") if k in shapes}


def _torch_module(family: str, path: tuple[str, ...]) -> str:
  """agad module path -> the PyTorch module name of ``family``."""
  name = "/".join(path)
  if family == "smallcnn":
    if m := re.fullmatch(r"stage(\d)_conv(\d)", name):
      return f"feature_extractor.conv{2 * (int(m[1]) - 1) + int(m[2]) + 1}"
    if m := re.fullmatch(r"fc(\d)", name):
      return f"classifier.fc{int(m[1]) + 1}"
    if name == "classifier":
      return "classifier.fc3"
  else:
    top = {
      "resnet": {"stem_conv": "conv1", "stem_bn": "bn1", "classifier": "linear"},
      "preact": {"stem_conv": "conv1", "final_bn": "bn", "classifier": "linear"},
      "wrn": {"stem_conv": "conv1", "final_bn": "bn1", "classifier": "fc"},
    }[family]
    if name in top:
      return top[name]
    if len(path) == 2 and (m := re.fullmatch(r"stage(\d+)_unit(\d+)", path[0])):
      s, i, layer = int(m[1]), int(m[2]), path[1]
      if family == "wrn":
        return f"block{s}.layer.{i}." + {"shortcut_conv": "convShortcut"}.get(layer, layer)
      return f"layer{s}.{i}." + {"shortcut_conv": "shortcut.0", "shortcut_bn": "shortcut.1"}.get(
        layer, layer
      )
  raise CheckpointMismatch(
    f"agad module {name!r} has no counterpart in the PyTorch {family} "
    "definition (a defense plug-in?): only the bare backbones convert"
  )


def table(arch: str, tmpl: Mapping) -> list[tuple[str, str, tuple, str]]:
  """``(torch key, collection, agad path, layout)`` for every tensor of ``arch``; layout is
  ``conv``, ``dense``, ``dense_nchw`` (SmallCNN's first Dense) or ``same``."""
  family = check_arch(arch)
  params = traverse_util.flatten_dict(dict(tmpl["params"]))
  modules: dict[tuple, dict] = {}
  for path, leaf in params.items():
    modules.setdefault(path[:-1], {})[path[-1]] = leaf
  rows = []
  for mod, leaves in modules.items():
    prefix = _torch_module(family, mod)
    if "scale" in leaves:
      rows += [(f"{prefix}.{t}", coll, mod + (leaf,), "same") for t, coll, leaf in _BN]
      continue
    kernel = leaves["kernel"]
    layout = (
      "conv"
      if len(kernel.shape) == 4
      else ("dense_nchw" if family == "smallcnn" and mod == ("fc0",) else "dense")
    )
    rows.append((f"{prefix}.weight", "params", mod + ("kernel",), layout))
    if "bias" in leaves:
      rows.append((f"{prefix}.bias", "params", mod + ("bias",), "same"))
  return rows


def bn_counters(rows) -> list[str]:
  """The ``num_batches_tracked`` keys of the BatchNorms in ``rows``."""
  return [
    k[: -len("running_mean")] + "num_batches_tracked"
    for k, *_ in rows
    if k.endswith(".running_mean")
  ]


def _nchw_channels(tmpl: Mapping) -> int:
  return int(tmpl["params"]["stage2_conv1"]["kernel"].shape[-1])


def to_agad(array: np.ndarray, layout: str, shape, channels: int = 0) -> np.ndarray:
  """A PyTorch tensor in agad's layout (``shape``: the agad leaf's shape)."""
  if layout == "conv":
    out = array.transpose(2, 3, 1, 0)
  elif layout == "dense":
    out = array.T
  elif layout == "dense_nchw":
    n_out, n_in = array.shape
    h = w = math.isqrt(n_in // channels)
    out = array.reshape(n_out, channels, h, w).transpose(2, 3, 1, 0).reshape(n_in, n_out)
  else:
    out = array
  return np.ascontiguousarray(out, np.float32).reshape(shape)


def to_torch(array: np.ndarray, layout: str, channels: int = 0) -> np.ndarray:
  """An agad leaf in PyTorch's layout (inverse of :func:`to_agad`)."""
  array = np.asarray(array, np.float32)
  if layout == "conv":
    out = array.transpose(3, 2, 0, 1)
  elif layout == "dense":
    out = array.T
  elif layout == "dense_nchw":
    n_in, n_out = array.shape
    h = w = math.isqrt(n_in // channels)
    out = array.reshape(h, w, channels, n_out).transpose(3, 2, 0, 1).reshape(n_out, n_in)
  else:
    out = array
  return np.ascontiguousarray(out)


def torch_shape(layout: str, shape) -> tuple:
  """The PyTorch shape of an agad leaf of ``shape``."""
  shape = tuple(int(d) for d in shape)
  if layout == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  if layout in ("dense", "dense_nchw"):
    return shape[::-1]
  return shape


def _listing(names, limit: int = 12) -> str:
  names = sorted(names)
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def _hint(arch: str, keys) -> str:
  family = ARCHS[arch]
  guess = next((f for f, key in _SIGNATURES if key in keys), None)
  if guess == "resnet" and "bn1.weight" not in keys:
    guess = "preact" if "layer1.0.bn1.weight" in keys else guess
  if guess is not None and guess != family:
    return f"; the keys look like a {guess} checkpoint: try --arch=" + "|".join(
      a for a, f in ARCHS.items() if f == guess
    )
  if family == "preact" and "layer1.0.bn1.weight" in keys and "bn.weight" not in keys:
    return (
      "; without bn.* this is RobustBench's PreActResNet18() (PreActBlock: the shortcut "
      "projects the raw input, no BN before the classifier), a different network from "
      "agad's preact_resnet18 = PreActResNet(PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True); "
      "it is not supported"
    )
  return ""


def num_classes_of(arch: str, state: Mapping[str, np.ndarray]) -> int:
  """The class count of a state dict (its classifier's rows)."""
  key = _torch_module(check_arch(arch), ("classifier",)) + ".weight"
  if key not in state:
    raise CheckpointMismatch(
      f"--arch={arch}: the classifier weight {key!r} is missing; the "
      f"checkpoint holds {_listing(state)}{_hint(arch, state)}"
    )
  return int(state[key].shape[0])


def torch_to_variables(
  arch: str, state: Mapping[str, np.ndarray], *, image_shape, num_classes: int | None = None
) -> tuple[dict, dict]:
  """A PyTorch state dict (numpy arrays) -> ``({'params', 'batch_stats'}, extras)``.

  ``extras``: ``num_batches_tracked`` (key -> int), ``ignored`` (keys no forward pass uses),
  ``input_mean``/``input_std`` (RobustBench's ``mu``/``sigma`` buffers, if present).
  Raises CheckpointMismatch listing missing and unexpected keys, or naming each tensor
  whose shape differs with both shapes.
  """
  family = check_arch(arch)
  state = dict(state)
  extras: dict[str, Any] = {}
  if all(k in state for k in NORM_BUFFERS):
    extras["input_mean"] = [float(v) for v in np.asarray(state.pop("mu"), np.float64).reshape(-1)]
    extras["input_std"] = [float(v) for v in np.asarray(state.pop("sigma"), np.float64).reshape(-1)]
  found = num_classes_of(arch, state)
  if num_classes is not None and found != num_classes:
    raise CheckpointMismatch(
      f"the checkpoint has {found} classes (its classifier weight has "
      f"{found} rows) but the dataset has {num_classes}: pick the matching --dataset"
    )
  tmpl = template(arch, num_classes=found, image_shape=image_shape)
  rows = table(arch, tmpl)
  counters = bn_counters(rows)
  expected = {k for k, *_ in rows}
  extras["ignored"] = sorted(k for k in state if k.startswith(IGNORED_PREFIXES.get(family, ())))
  missing = expected - set(state)
  unexpected = set(state) - expected - set(counters) - set(extras["ignored"])
  if missing or unexpected:
    what = [f"missing keys ({len(missing)}): {_listing(missing)}"] if missing else []
    what += [f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}"] if unexpected else []
    raise CheckpointMismatch(
      f"the checkpoint does not fit --arch={arch}: " + "; ".join(what) + _hint(arch, state)
    )
  flat_t = {coll: traverse_util.flatten_dict(dict(tmpl[coll])) for coll in tmpl}
  channels = _nchw_channels(tmpl) if family == "smallcnn" else 0
  wrong, out = [], {"params": {}, "batch_stats": {}}
  for key, coll, path, layout in rows:
    want = torch_shape(layout, flat_t[coll][path].shape)
    got = tuple(state[key].shape)
    if got != want:
      wrong.append(f"{key}: checkpoint {got}, --arch={arch} expects {want}")
      continue
    out[coll][path] = to_agad(np.asarray(state[key]), layout, flat_t[coll][path].shape, channels)
  if wrong:
    h, w, c = image_shape
    raise CheckpointMismatch(
      f"tensor shapes differ from --arch={arch} ({found} classes, {h}x{w}x{c} "
      f"images): " + "; ".join(wrong[:12]) + _hint(arch, state)
    )
  extras["num_batches_tracked"] = {
    k: int(np.asarray(state[k]).reshape(())) for k in counters if k in state
  }
  variables = {coll: traverse_util.unflatten_dict(v) for coll, v in out.items() if v}
  return variables, extras


def variables_to_torch(
  arch: str,
  variables: Mapping,
  *,
  image_shape,
  num_batches_tracked: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
  """agad variables ``{'params', 'batch_stats'}`` -> a PyTorch state dict (numpy arrays,
  float32; ``num_batches_tracked`` int64, 0 unless given) under the family's key names.

  Raises CheckpointMismatch if the variables are not exactly the bare backbone's (a
  plug-in's parameters, another width).
  """
  family = check_arch(arch)
  params = traverse_util.flatten_dict(dict(variables["params"]))
  num_classes = int(np.shape(params[("classifier", "kernel")])[-1])
  tmpl = template(arch, num_classes=num_classes, image_shape=image_shape)
  flat_v = {coll: traverse_util.flatten_dict(dict(variables.get(coll, {}))) for coll in tmpl}
  flat_t = {coll: traverse_util.flatten_dict(dict(tmpl[coll])) for coll in tmpl}
  problems = []
  for coll in tmpl:
    extra = set(flat_v[coll]) - set(flat_t[coll])
    absent = set(flat_t[coll]) - set(flat_v[coll])
    problems += [
      f"{coll} {'/'.join(p)}: not in the PyTorch {family} definition" for p in sorted(extra)
    ]
    problems += [f"{coll} {'/'.join(p)}: missing" for p in sorted(absent)]
    problems += [
      f"{coll} {'/'.join(p)}: shape {tuple(np.shape(flat_v[coll][p]))} != {tuple(t.shape)}"
      for p, t in flat_t[coll].items()
      if p in flat_v[coll] and np.shape(flat_v[coll][p]) != t.shape
    ]
  if problems:
    raise CheckpointMismatch(
      f"the model is not a bare {arch} (only the backbones convert, without "
      "plug-ins): " + "; ".join(problems[:12])
    )
  channels = _nchw_channels(tmpl) if family == "smallcnn" else 0
  rows = table(arch, tmpl)
  out = {
    key: to_torch(np.asarray(flat_v[coll][path]), layout, channels)
    for key, coll, path, layout in rows
  }
  for key in bn_counters(rows):
    out[key] = np.asarray((num_batches_tracked or {}).get(key, 0), np.int64)
  return out


# ------------------------------------------------------------------ files


def unwrap(obj: Any, path: str = "<state dict>") -> dict:
  """The state dict inside ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers (nested),
  with DataParallel's ``module.`` prefix removed."""
  while isinstance(obj, Mapping):
    inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
    if inner is None:
      break
    obj = inner
  if not isinstance(obj, Mapping):
    raise ValueError(
      f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of "
      "tensor names to tensors); save model.state_dict()"
    )
  state = dict(obj)
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module.") :]: v for k, v in state.items()}
  return state


def _torch_to_numpy(state: Mapping, path: str) -> dict[str, np.ndarray]:
  import torch  # optional: only .pt/.pth files need it, and it is no agad dependency

  out, bad = {}, []
  for k, v in state.items():
    if not isinstance(v, torch.Tensor):
      bad.append(f"{k} ({type(v).__name__})")
      continue
    v = v.detach().cpu()
    out[k] = (v.float() if v.is_floating_point() else v).numpy()
  if bad:
    raise ValueError(
      f"{path}: entries that are not tensors: {_listing(bad)}; save model.state_dict()"
    )
  return out


def read_state_dict(path: str) -> tuple[dict[str, np.ndarray], str]:
  """A checkpoint file -> ``(state dict of numpy arrays, format)``.

  ``.safetensors``: read with ``safetensors.numpy`` (no torch needed). ``.pt``/``.pth``:
  ``torch.load(weights_only=True)`` when torch is installed; a pickle that needs arbitrary
  code is refused, never unpickled. Float tensors become float32.
  """
  lower = path.lower()
  if lower.endswith(".safetensors"):
    try:
      state = safetensors.numpy.load_file(path)
    except Exception as e:  # noqa: BLE001  (the library raises its own error types)
      raise ValueError(
        f"{path} is not a readable safetensors file ({type(e).__name__}: {e})"
      ) from None
    state = unwrap(state, path)
    return {
      k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in state.items()
    }, "safetensors"
  if lower.endswith((".pt", ".pth")):
    try:
      import torch  # optional: only .pt/.pth files need it, and it is no agad dependency
    except ImportError:
      raise ValueError(
        f"{path}: reading .pt/.pth needs PyTorch (pip install torch); or convert it "
        "once where torch is installed: safetensors.torch.save_file("
        'torch.load(FILE, weights_only=True), "model.safetensors")'
      ) from None
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
      text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch colours its message
      lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(e).__name__]
      why = next((line for line in lines if "Unsupported global" in line), lines[0])
      raise ValueError(
        f"{path} needs unpickling arbitrary code (refused: torch.load(weights_only=True) "
        f"says: {why}); load it yourself where you trust it and re-save "
        "model.state_dict() with torch.save or safetensors"
      ) from None
    return _torch_to_numpy(unwrap(obj, path), path), "pytorch pickle (weights_only)"
  raise ValueError(f"{path}: unknown checkpoint format; use one of {', '.join(FORMATS)}")


def write_safetensors(
  path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]
) -> None:
  """Writes ``tensors`` (and string ``metadata``) as a safetensors file."""
  # np.require, not ascontiguousarray: that makes 0-d counters 1-d.
  safetensors.numpy.save_file(
    {k: np.require(v, requirements="C") for k, v in tensors.items()},
    path,
    metadata={k: str(v) for k, v in metadata.items()},
  )


def read_metadata(path: str) -> dict[str, str]:
  """A safetensors file's string metadata."""
  with safe_open(path, framework="np") as f:
    return dict(f.metadata() or {})
