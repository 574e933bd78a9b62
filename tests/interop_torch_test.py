"""PyTorch checkpoints in and out (agad/interop/torch_checkpoint.py, launch.import_torch /
export_torch), without torch: state dicts are built here in each architecture's PyTorch layout
from the public definitions' structure (docs/pytorch.md names them), independently of the
library's name table."""

import os
import sys

import chex
import jax
import numpy as np
import pytest
import safetensors.numpy

from agad import models as models_lib
from agad.interop import torch_checkpoint as tc
from tests.smoke import launch_env, needs_data, run_chain, run_module, tail

# ------------------------------------------------------------ PyTorch-layout state dicts
# Shapes as each PyTorch module creates them: Conv2d weight [out, in, kh, kw], Linear weight
# [out, in], BatchNorm2d weight/bias/running_mean/running_var [C] and num_batches_tracked [].


def _bn(sd, name, c):
  sd.update(
    {
      f"{name}.weight": (c,),
      f"{name}.bias": (c,),
      f"{name}.running_mean": (c,),
      f"{name}.running_var": (c,),
      f"{name}.num_batches_tracked": (),
    }
  )


def smallcnn_shapes(classes=10, channels=1, side=28):
  """TRADES models/small_cnn.py SmallCNN: four 3x3 valid convs, two 2x2 pools, fc1..fc3."""
  sd = {}
  for i, (cin, cout) in enumerate([(channels, 32), (32, 32), (32, 64), (64, 64)], 1):
    sd[f"feature_extractor.conv{i}.weight"], sd[f"feature_extractor.conv{i}.bias"] = (
      (cout, cin, 3, 3),
      (cout,),
    )
  s = ((side - 4) // 2 - 4) // 2
  for i, (n_in, n_out) in enumerate([(64 * s * s, 200), (200, 200), (200, classes)], 1):
    sd[f"classifier.fc{i}.weight"], sd[f"classifier.fc{i}.bias"] = (n_out, n_in), (n_out,)
  return sd


def resnet_shapes(blocks=(2, 2, 2, 2), classes=10, preact=False):
  """kuangliu ResNet(BasicBlock) (preact=False) or RobustBench PreActResNet(PreActBlockV2,
  bn_before_fc=True): conv1 [bn1], layer{s}.{i}.*, shortcut.0 [.1], [bn], linear."""
  sd = {"conv1.weight": (64, 3, 3, 3)}
  if not preact:
    _bn(sd, "bn1", 64)
  cin = 64
  for s, (n, planes) in enumerate(zip(blocks, (64, 128, 256, 512)), 1):
    for i in range(n):
      p, stride = f"layer{s}.{i}", (2 if s > 1 and i == 0 else 1)
      if preact:
        _bn(sd, f"{p}.bn1", cin)
        _bn(sd, f"{p}.bn2", planes)
      else:
        _bn(sd, f"{p}.bn1", planes)
        _bn(sd, f"{p}.bn2", planes)
      sd[f"{p}.conv1.weight"], sd[f"{p}.conv2.weight"] = (planes, cin, 3, 3), (planes, planes, 3, 3)
      if stride != 1 or cin != planes:
        sd[f"{p}.shortcut.0.weight"] = (planes, cin, 1, 1)
        if not preact:
          _bn(sd, f"{p}.shortcut.1", planes)
      cin = planes
  if preact:
    _bn(sd, "bn", 512)
  sd["linear.weight"], sd["linear.bias"] = (classes, 512), (classes,)
  return sd


def wrn_shapes(depth, k, classes=10):
  """TRADES / RobustBench WideResNet: conv1, block{b}.layer.{i}.*, convShortcut, bn1, fc."""
  n, widths = (depth - 4) // 6, (16, 16 * k, 32 * k, 64 * k)
  sd = {"conv1.weight": (16, 3, 3, 3)}
  for b in (1, 2, 3):
    for i in range(n):
      cin, cout, p = widths[b - 1] if i == 0 else widths[b], widths[b], f"block{b}.layer.{i}"
      _bn(sd, f"{p}.bn1", cin)
      _bn(sd, f"{p}.bn2", cout)
      sd[f"{p}.conv1.weight"], sd[f"{p}.conv2.weight"] = (cout, cin, 3, 3), (cout, cout, 3, 3)
      if cin != cout:
        sd[f"{p}.convShortcut.weight"] = (cout, cin, 1, 1)
  _bn(sd, "bn1", 64 * k)
  sd["fc.weight"], sd["fc.bias"] = (classes, 64 * k), (classes,)
  return sd


ARCH_SHAPES = {
  "smallcnn": (smallcnn_shapes, (28, 28, 1)),
  "resnet18": (resnet_shapes, (32, 32, 3)),
  "preact_resnet18": (lambda: resnet_shapes(preact=True), (32, 32, 3)),
  "wrn28_10": (lambda: wrn_shapes(28, 10), (32, 32, 3)),
  "wrn34_10": (lambda: wrn_shapes(34, 10), (32, 32, 3)),
}


def fill(shapes, seed=0):
  """Random float32 tensors of the given shapes: weights N(0, 1/fan_in) (activations stay
  O(1)), biases N(0, 0.01), running_var in [0.5, 2], counters int64."""
  rng = np.random.default_rng(seed)
  out = {}
  for k, shape in shapes.items():
    if k.endswith("num_batches_tracked"):
      out[k] = np.asarray(rng.integers(0, 10**6), np.int64)
    elif k.endswith("running_var"):
      out[k] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    else:
      scale = 1 / np.sqrt(np.prod(shape[1:])) if len(shape) > 1 else 0.1
      out[k] = (scale * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
  return out


# ------------------------------------------------------------ names, shapes, round trips


@pytest.mark.parametrize("arch", sorted(ARCH_SHAPES))
def test_table_has_the_pytorch_definitions_names_and_shapes(arch):
  make, image = ARCH_SHAPES[arch]
  shapes = make()
  tmpl = tc.template(arch, num_classes=10, image_shape=image)
  rows = tc.table(arch, tmpl)
  flat = {c: jax.tree_util.tree_flatten_with_path(tmpl[c])[0] for c in tmpl}
  ours = {
    key: tc.torch_shape(layout, _leaf(tmpl, coll, path).shape) for key, coll, path, layout in rows
  }
  ours.update({k: () for k in tc.bn_counters(rows)})
  assert ours == shapes
  assert sum(len(v) for v in flat.values()) == len(rows)  # every agad leaf has a PyTorch tensor


def _leaf(tree, coll, path):
  node = tree[coll]
  for p in path:
    node = node[p]
  return node


@pytest.mark.parametrize("arch", ["smallcnn", "resnet18", "preact_resnet18", "wrn28_10"])
def test_safetensors_import_then_export_is_bitwise(arch, tmp_path):
  make, image = ARCH_SHAPES[arch]
  original = fill(make(), seed=len(arch))
  path = str(tmp_path / "in.safetensors")
  safetensors.numpy.save_file(original, path)
  state, fmt = tc.read_state_dict(path)
  assert fmt == "safetensors"
  variables, extras = tc.torch_to_variables(arch, state, image_shape=image, num_classes=10)
  back = tc.variables_to_torch(
    arch, variables, image_shape=image, num_batches_tracked=extras["num_batches_tracked"]
  )
  out = str(tmp_path / "out.safetensors")
  tc.write_safetensors(out, back, {"agad_arch": arch})
  again = safetensors.numpy.load_file(out)
  assert sorted(again) == sorted(original)
  for k, v in original.items():
    assert again[k].dtype == v.dtype and again[k].shape == v.shape, k
    assert again[k].tobytes() == v.tobytes(), k
  assert tc.read_metadata(out) == {"agad_arch": arch}


# ------------------------------------------------------------ SmallCNN logits vs NumPy


def _conv_nchw(x, w, b):
  """PyTorch Conv2d(kernel 3, stride 1, padding 0) on NCHW with OIHW weights."""
  windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))  # [N, C, H', W', 3, 3]
  return np.einsum("nchwij,ocij->nohw", windows, w) + b[None, :, None, None]


def _pool_nchw(x):
  n, c, h, w = x.shape
  return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def torch_smallcnn_numpy(sd, x_nchw):
  """TRADES SmallCNN.forward in float64 NumPy: convs, ReLUs, pools, view(-1, 64*4*4), fc1..3."""
  relu = lambda v: np.maximum(v, 0)
  g = {k: v.astype(np.float64) for k, v in sd.items()}
  h = x_nchw.astype(np.float64)
  for i in (1, 2, 3, 4):
    h = relu(
      _conv_nchw(h, g[f"feature_extractor.conv{i}.weight"], g[f"feature_extractor.conv{i}.bias"])
    )
    if i in (2, 4):
      h = _pool_nchw(h)
  h = h.reshape(h.shape[0], -1)  # NCHW flatten, as PyTorch's view
  h = relu(h @ g["classifier.fc1.weight"].T + g["classifier.fc1.bias"])
  h = relu(h @ g["classifier.fc2.weight"].T + g["classifier.fc2.bias"])
  return h @ g["classifier.fc3.weight"].T + g["classifier.fc3.bias"]


def test_imported_smallcnn_logits_equal_pytorch_semantics_in_numpy():
  sd = fill(smallcnn_shapes(), seed=3)
  variables, _ = tc.torch_to_variables("smallcnn", sd, image_shape=(28, 28, 1))
  x = np.random.default_rng(1).uniform(0, 1, (2, 28, 28, 1)).astype(np.float32)
  model = models_lib.build_model(
    "smallcnn", num_classes=10, mean=(0.0,), std=(1.0,), input_norm="none"
  )
  logits = np.asarray(model.apply(variables, x, train=False))
  expected = torch_smallcnn_numpy(sd, x.transpose(0, 3, 1, 2))
  chex.assert_shape(logits, (2, 10))
  assert 0.1 < np.abs(expected).max() < 100  # not vacuous, and O(1) so float32 tolerances apply
  chex.assert_trees_all_close(logits, expected.astype(np.float32), rtol=1e-4, atol=1e-5)
  # The flatten order matters: the NHWC reading of the same weights gives other logits.
  wrong = dict(sd)
  wrong["classifier.fc1.weight"] = (
    sd["classifier.fc1.weight"].reshape(200, 64, 16).transpose(0, 2, 1).reshape(200, -1)
  )
  other, _ = tc.torch_to_variables("smallcnn", wrong, image_shape=(28, 28, 1))
  assert np.abs(np.asarray(model.apply(other, x, train=False)) - logits).max() > 1e-3


# ------------------------------------------------------------ bad input


def _small():
  return fill(smallcnn_shapes())


def test_missing_and_unexpected_keys_are_listed():
  sd = _small()
  del sd["classifier.fc2.bias"]
  sd["classifier.fc4.weight"] = np.zeros((2, 2), np.float32)
  with pytest.raises(
    tc.CheckpointMismatch,
    match=r"missing keys \(1\): classifier\.fc2\.bias; "
    r"unexpected keys \(1\): classifier\.fc4\.weight",
  ):
    tc.torch_to_variables("smallcnn", sd, image_shape=(28, 28, 1))


def test_shape_mismatch_names_the_tensor_and_both_shapes():
  sd = _small()
  sd["feature_extractor.conv2.weight"] = np.zeros((32, 16, 3, 3), np.float32)
  with pytest.raises(
    tc.CheckpointMismatch,
    match=r"feature_extractor\.conv2\.weight: checkpoint "
    r"\(32, 16, 3, 3\), --arch=smallcnn expects \(32, 32, 3, 3\)",
  ):
    tc.torch_to_variables("smallcnn", sd, image_shape=(28, 28, 1))
  # CIFAR-size SmallCNN weights on 28x28 images: fc1 names both shapes.
  with pytest.raises(
    tc.CheckpointMismatch, match=r"classifier\.fc1\.weight: checkpoint \(200, 1600\)"
  ):
    tc.torch_to_variables(
      "smallcnn", fill(smallcnn_shapes(channels=1, side=32)), image_shape=(28, 28, 1)
    )


def test_unknown_arch_lists_the_known_ones_and_wrong_arch_is_named():
  with pytest.raises(
    ValueError, match=r"unknown architecture 'vgg19'; known: smallcnn, resnet18, .*wrn34_10"
  ):
    tc.torch_to_variables("vgg19", _small(), image_shape=(28, 28, 1))
  resnet = {k: np.zeros(s, np.float32) for k, s in resnet_shapes().items()}
  with pytest.raises(
    tc.CheckpointMismatch, match=r"look like a resnet checkpoint: try --arch=resnet18"
  ):
    tc.torch_to_variables("wrn28_10", resnet, image_shape=(32, 32, 3))
  preact_v1 = {
    k: np.zeros(s, np.float32)
    for k, s in resnet_shapes(preact=True).items()
    if not k.startswith("bn.")
  }
  with pytest.raises(
    tc.CheckpointMismatch, match=r"missing keys \(4\): bn\.bias.*RobustBench's PreActResNet18\(\)"
  ):
    tc.torch_to_variables("preact_resnet18", preact_v1, image_shape=(32, 32, 3))
  with pytest.raises(
    tc.CheckpointMismatch, match=r"the checkpoint has 10 classes .* dataset has 100"
  ):
    tc.torch_to_variables("smallcnn", _small(), image_shape=(28, 28, 1), num_classes=100)


def test_wrappers_prefixes_buffers_and_ignored_blocks():
  inner = {"module.a.weight": np.ones(2, np.float32)}
  assert tc.unwrap({"epoch": 3, "state_dict": {"model": inner}}) == {
    "a.weight": inner["module.a.weight"]
  }
  with pytest.raises(ValueError, match="holds a list, not a state dict"):
    tc.unwrap([1, 2], "x.pt")
  sd = fill(wrn_shapes(16, 8))
  sd.update(
    mu=np.array([0.5, 0.4, 0.3], np.float32).reshape(1, 3, 1, 1),
    sigma=np.array([0.25, 0.25, 0.25], np.float32).reshape(1, 3, 1, 1),
    **{"sub_block1.layer.0.conv1.weight": np.zeros((128, 16, 3, 3), np.float32)},
  )
  _, extras = tc.torch_to_variables("wrn16_8", sd, image_shape=(32, 32, 3))
  np.testing.assert_allclose(extras["input_mean"], [0.5, 0.4, 0.3], rtol=1e-6)
  assert extras["input_std"] == [0.25] * 3
  assert extras["ignored"] == ["sub_block1.layer.0.conv1.weight"]


def test_pickles_need_torch_and_other_files_are_named(tmp_path, monkeypatch):
  pt = tmp_path / "model.pt"
  pt.write_bytes(b"PK\x03\x04 not really")
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  with pytest.raises(ValueError, match=r"model\.pt: reading \.pt/\.pth needs PyTorch"):
    tc.read_state_dict(str(pt))
  with pytest.raises(
    ValueError, match=r"unknown checkpoint format; use one of \.safetensors, \.pt, \.pth"
  ):
    tc.read_state_dict(str(tmp_path / "model.h5"))
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
  with pytest.raises(ValueError, match=r"bad\.safetensors is not a readable safetensors file"):
    tc.read_state_dict(str(bad))


def test_pickle_with_arbitrary_code_is_refused(tmp_path):
  torch = pytest.importorskip(
    "torch"
  )  # only where torch is installed (tools/torch_parity.py's env)

  class Payload:
    pass

  path = str(tmp_path / "evil.pt")
  torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": Payload()}, path)
  with pytest.raises(ValueError, match=r"evil\.pt needs unpickling arbitrary code \(refused"):
    tc.read_state_dict(path)


def test_export_refuses_a_model_with_a_plug_in():
  variables, _ = tc.torch_to_variables("smallcnn", _small(), image_shape=(28, 28, 1))
  variables["params"]["plugin_features"] = {"kernel": np.zeros((3, 3), np.float32)}
  with pytest.raises(
    tc.CheckpointMismatch,
    match=r"not a bare smallcnn.*params plugin_features/kernel: "
    r"not in the PyTorch smallcnn definition",
  ):
    tc.variables_to_torch("smallcnn", variables, image_shape=(28, 28, 1))


def test_input_norm_values():
  from launch.torch_workdir import resolve_input_norm

  buffers = {"input_mean": [0.5, 0.4, 0.3], "input_std": [0.2, 0.2, 0.2]}
  assert resolve_input_norm("auto", {}, 3)[:3] == ("none", None, None)
  assert resolve_input_norm("auto", buffers, 3)[:3] == ("dataset", (0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
  assert resolve_input_norm("cifar10", {}, 3)[1] == (0.4914, 0.4822, 0.4465)
  assert resolve_input_norm("svhn", {}, 3)[2] == (0.198, 0.201, 0.197)
  assert resolve_input_norm("imagenet", {}, 3)[1] == (0.485, 0.456, 0.406)
  assert resolve_input_norm("0.5/0.25", {}, 1)[1:3] == ((0.5,), (0.25,))
  assert resolve_input_norm("checkpoint", buffers, 3)[1] == (0.5, 0.4, 0.3)
  with pytest.raises(ValueError, match="normalises inside the model"):
    resolve_input_norm("none", buffers, 3)
  with pytest.raises(ValueError, match="has no mu/sigma buffers"):
    resolve_input_norm("checkpoint", {}, 3)
  with pytest.raises(ValueError, match=r"'cifar11' is invalid: auto \| none \| checkpoint"):
    resolve_input_norm("cifar11", {}, 3)
  with pytest.raises(ValueError, match="must have 1 or 3 values and a positive std"):
    resolve_input_norm("0.5,0.5/0.2,0.2", {}, 3)


# ------------------------------------------------------------ the launch commands


@needs_data
@pytest.mark.slow
def test_import_evaluate_flags_finetune_export_smoke(tmp_path):
  """launch.import_torch writes a workdir that agad.load, launch.evaluate's and
  launch.attention's flag checks and --config.init.workdir (TRADES, one smoke step) take;
  launch.export_torch gives the imported file back bitwise."""
  import agad
  from launch import common, torch_workdir

  original = fill(smallcnn_shapes(), seed=5)
  src, wd, out = (
    str(tmp_path / "trades.safetensors"),
    str(tmp_path / "imported"),
    str(tmp_path / "out.safetensors"),
  )
  safetensors.numpy.save_file(original, src)
  env = launch_env()
  done = run_module(
    ["launch.import_torch", "--arch=smallcnn", f"--checkpoint={src}", f"--workdir={wd}"], env=env
  )
  assert done.returncode == 0, tail(done)
  assert '"input_norm": "none ([0, 1] pixels)"' in done.stdout
  with pytest.raises(ValueError, match="already holds checkpoints; import into a new directory"):
    torch_workdir.prepare("smallcnn", src, wd)
  loaded = agad.load(wd)
  assert loaded.step == 0 and loaded.config.model.input_norm == "none"
  x = np.random.default_rng(0).uniform(0, 1, (2, 28, 28, 1)).astype(np.float32)
  chex.assert_trees_all_close(
    np.asarray(loaded.logits_fn(x)),
    torch_smallcnn_numpy(original, x.transpose(0, 3, 1, 2)).astype(np.float32),
    rtol=1e-4,
    atol=1e-5,
  )
  common.check_evaluate_flags(workdir=wd, preset="autoattack")
  common.check_attention_flags(workdir=wd)
  exported = run_module(["launch.export_torch", f"--workdir={wd}", f"--output={out}"], env=env)
  assert exported.returncode == 0, tail(exported)
  again = safetensors.numpy.load_file(out)
  assert sorted(again) == sorted(original) and all(
    again[k].tobytes() == v.tobytes() for k, v in original.items()
  )
  assert tc.read_metadata(out)["input_norm"] == "none"
  # Fine-tuning under the dataset's default normalisation would feed the weights other inputs.
  from agad import data as data_lib
  from agad.training import builders
  from configs import fashion_mnist

  config = fashion_mnist.get_config("smallcnn,trades,smoke")
  config.init.workdir = wd
  with pytest.raises(
    ValueError,
    match=r"normalised as \('none',\), this config normalises them as "
    r"\('dataset', \(0\.286,\), \(0\.353,\)\).*Add --config\.model\.input_norm=none",
  ):
    builders.check_init_normalisation(config, data_lib.dataset_info(config.data))
  config.model.input_norm = "none"
  builders.check_init_normalisation(config, data_lib.dataset_info(config.data))
  tuned = run_chain(
    "launch.train",
    [
      [
        "--config=configs/fashion_mnist.py:smallcnn,trades,smoke",
        f"--config.init.workdir={wd}",
        "--config.model.input_norm=none",
        "--config.stop_after_steps=1",
        f"--workdir={tmp_path / 'tuned'}",
      ]
    ],
    env=env,
  )
  assert tuned.returncode == 0, tail(tuned)
  assert os.path.isdir(os.path.join(tmp_path, "tuned", "checkpoints", "1"))
