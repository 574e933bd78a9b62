"""PyTorch <-> agad parity of launch.import_torch / launch.export_torch, per architecture.

Three phases over one folder; ``make`` and ``check`` need torch (not agad), ``agad`` needs
agad (not torch), ``all`` runs the three in one environment that has both:

  PYTHONPATH=TORCH_SITE python3.11 tools/torch_parity.py --phase=make --dir=D
  python tools/torch_parity.py --phase=agad --dir=D
  PYTHONPATH=TORCH_SITE python3.11 tools/torch_parity.py --phase=check --dir=D

make: for every architecture a randomly initialised PyTorch model (the module layout of the
  public definitions, see docs/pytorch.md) with randomised BatchNorm running statistics, in
  eval mode; its state dict as ``<arch>.safetensors``, and its logits on fixed random images.
agad: ``launch.import_torch`` of each file into ``D/<arch>_workdir`` and agad's logits on the
  same images (max abs difference to PyTorch's printed); ``launch.export_torch`` of that
  workdir to ``<arch>_export.safetensors``.
check: a fresh PyTorch model ``load_state_dict(strict=True)`` of the export; its logits
  against agad's. Prints one JSON line per architecture and phase; exits 1 above ``--tol``.
autoattack (torch and pyautoattack): the reference AutoAttack on a SmallCNN state dict
  (``--checkpoint``), the first ``--n`` Fashion-MNIST test images at ``--eps``; compare with
  ``launch.evaluate --preset=autoattack`` of the same file imported (docs/pytorch.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict

import numpy as np

ARCHS = {
  "smallcnn": (28, 28, 1),
  "resnet18": (32, 32, 3),
  "preact_resnet18": (32, 32, 3),
  "wrn28_10": (32, 32, 3),
  "wrn34_10": (32, 32, 3),
}
N_IMAGES = 8


# ----------------------------------------------------------------- PyTorch models (torch only)


def torch_models():
  """``{arch: constructor}`` with the public definitions' module names (written anew)."""
  import torch
  from torch import nn
  from torch.nn import functional as F

  class SmallCNN(nn.Module):  # TRADES models/small_cnn.py
    def __init__(self):
      super().__init__()
      chans = [(1, 32), (32, 32), (32, 64), (64, 64)]
      layers = []
      for i, (a, b) in enumerate(chans, 1):
        layers += [(f"conv{i}", nn.Conv2d(a, b, 3)), (f"relu{i}", nn.ReLU())]
        if i % 2 == 0:
          layers.append((f"maxpool{i // 2}", nn.MaxPool2d(2, 2)))
      self.feature_extractor = nn.Sequential(OrderedDict(layers))
      self.classifier = nn.Sequential(
        OrderedDict(
          [
            ("fc1", nn.Linear(64 * 4 * 4, 200)),
            ("relu1", nn.ReLU()),
            ("drop", nn.Dropout(0.5)),
            ("fc2", nn.Linear(200, 200)),
            ("relu2", nn.ReLU()),
            ("fc3", nn.Linear(200, 10)),
          ]
        )
      )

    def forward(self, x):
      return self.classifier(self.feature_extractor(x).view(-1, 64 * 4 * 4))

  class Basic(nn.Module):  # kuangliu / RobustBench BasicBlock
    def __init__(self, cin, planes, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.shortcut = nn.Sequential()
      if stride != 1 or cin != planes:
        self.shortcut = nn.Sequential(
          nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
        )

    def forward(self, x):
      y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
      return F.relu(y + self.shortcut(x))

  class PreAct(nn.Module):  # RobustBench PreActBlockV2: the projection reads the activated input
    def __init__(self, cin, planes, stride):
      super().__init__()
      self.bn1 = nn.BatchNorm2d(cin)
      self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      if stride != 1 or cin != planes:
        self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False))

    def forward(self, x):
      a = F.relu(self.bn1(x))
      skip = self.shortcut(a) if hasattr(self, "shortcut") else x
      return self.conv2(F.relu(self.bn2(self.conv1(a)))) + skip

  class ResNet(nn.Module):  # ResNet(BasicBlock) or PreActResNet(PreActBlockV2, bn_before_fc=True)
    def __init__(self, preact):
      super().__init__()
      self.preact = preact
      self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
      if not preact:
        self.bn1 = nn.BatchNorm2d(64)
      cin = 64
      for s, planes in enumerate((64, 128, 256, 512), 1):
        blocks = []
        for i in range(2):
          blocks.append((PreAct if preact else Basic)(cin, planes, 2 if s > 1 and i == 0 else 1))
          cin = planes
        setattr(self, f"layer{s}", nn.Sequential(*blocks))
      if preact:
        self.bn = nn.BatchNorm2d(512)
      self.linear = nn.Linear(512, 10)

    def forward(self, x):
      x = self.conv1(x) if self.preact else F.relu(self.bn1(self.conv1(x)))
      x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
      if self.preact:
        x = F.relu(self.bn(x))
      return self.linear(F.avg_pool2d(x, 4).flatten(1))

  class WideBlock(nn.Module):  # TRADES / RobustBench wide_resnet.py BasicBlock
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.equal = cin == cout
      self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
      a = F.relu(self.bn1(x))
      y = self.conv2(F.relu(self.bn2(self.conv1(a))))
      return y + (x if self.equal else self.convShortcut(a))

  class Group(nn.Module):
    def __init__(self, n, cin, cout, stride):
      super().__init__()
      self.layer = nn.Sequential(
        *[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]
      )

    def forward(self, x):
      return self.layer(x)

  class WideResNet(nn.Module):
    def __init__(self, depth, k):
      super().__init__()
      n, w = (depth - 4) // 6, (16, 16 * k, 32 * k, 64 * k)
      self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
      self.block1, self.block2, self.block3 = (
        Group(n, w[0], w[1], 1),
        Group(n, w[1], w[2], 2),
        Group(n, w[2], w[3], 2),
      )
      self.bn1 = nn.BatchNorm2d(w[3])
      self.fc = nn.Linear(w[3], 10)
      self.width = w[3]

    def forward(self, x):
      x = F.relu(self.bn1(self.block3(self.block2(self.block1(self.conv1(x))))))
      return self.fc(F.avg_pool2d(x, 8).view(-1, self.width))

  del torch
  return {
    "smallcnn": SmallCNN,
    "resnet18": lambda: ResNet(False),
    "preact_resnet18": lambda: ResNet(True),
    "wrn28_10": lambda: WideResNet(28, 10),
    "wrn34_10": lambda: WideResNet(34, 10),
  }


def _images(arch):
  h, w, c = ARCHS[arch]
  return np.random.default_rng(0).uniform(0, 1, (N_IMAGES, h, w, c)).astype(np.float32)  # NHWC


def _torch_logits(model, arch):
  import torch

  with torch.no_grad():
    return model(torch.from_numpy(_images(arch).transpose(0, 3, 1, 2).copy())).numpy()


def phase_make(folder, archs):
  import torch
  from safetensors.torch import save_file

  torch.manual_seed(0)
  for arch in archs:
    model = torch_models()[arch]()
    for m in model.modules():  # BN statistics and affine parameters away from their defaults
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
        m.weight.data.uniform_(0.5, 1.5)
        m.bias.data.uniform_(-0.2, 0.2)
        m.num_batches_tracked.fill_(1234)
    model.eval()
    save_file(
      {k: v.contiguous() for k, v in model.state_dict().items()},
      os.path.join(folder, f"{arch}.safetensors"),
    )
    torch.save(model.state_dict(), os.path.join(folder, f"{arch}.pt"))
    logits = _torch_logits(model, arch)
    np.save(os.path.join(folder, f"{arch}_torch_logits.npy"), logits)
    print(
      json.dumps(
        {
          "phase": "make",
          "arch": arch,
          "tensors": len(model.state_dict()),
          "logit_scale": float(np.abs(logits).max()),
          "torch": torch.__version__,
        }
      ),
      flush=True,
    )


def phase_agad(folder, archs):
  import agad
  from launch import torch_workdir

  worst = 0.0
  for arch in archs:
    workdir = os.path.join(folder, f"{arch}_workdir")
    torch_workdir.import_checkpoint(arch, os.path.join(folder, f"{arch}.safetensors"), workdir)
    logits = np.asarray(agad.load(workdir).logits_fn(_images(arch)))
    np.save(os.path.join(folder, f"{arch}_agad_logits.npy"), logits)
    diff = float(np.abs(logits - np.load(os.path.join(folder, f"{arch}_torch_logits.npy"))).max())
    worst = max(worst, diff)
    torch_workdir.export(workdir, os.path.join(folder, f"{arch}_export.safetensors"))
    print(
      json.dumps(
        {
          "phase": "agad",
          "arch": arch,
          "import_max_abs_logit_diff": diff,
          "same_argmax": bool(
            (
              logits.argmax(1)
              == np.load(os.path.join(folder, f"{arch}_torch_logits.npy")).argmax(1)
            ).all()
          ),
        }
      ),
      flush=True,
    )
  return worst


def phase_check(folder, archs):
  import torch
  from safetensors.torch import load_file

  worst = 0.0
  for arch in archs:
    model = torch_models()[arch]()
    exported = load_file(os.path.join(folder, f"{arch}_export.safetensors"))
    model.load_state_dict(exported, strict=True)
    model.eval()
    logits = _torch_logits(model, arch)
    diff = float(np.abs(logits - np.load(os.path.join(folder, f"{arch}_agad_logits.npy"))).max())
    original = load_file(os.path.join(folder, f"{arch}.safetensors"))
    bitwise = sorted(original) == sorted(exported) and all(
      torch.equal(original[k], exported[k]) for k in original
    )
    worst = max(worst, diff)
    print(
      json.dumps(
        {
          "phase": "check",
          "arch": arch,
          "export_max_abs_logit_diff": diff,
          "strict_load": True,
          "export_equals_original_bitwise": bitwise,
        }
      ),
      flush=True,
    )
  return worst


def fashion_mnist_test(n):
  """The first ``n`` Fashion-MNIST test images ([N, 28, 28, 1] float32 in [0, 1]) and labels."""
  import gzip

  folder = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
  with gzip.open(os.path.join(folder, "t10k-images-idx3-ubyte.gz")) as f:
    images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)[:n]
  with gzip.open(os.path.join(folder, "t10k-labels-idx1-ubyte.gz")) as f:
    labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n].astype(np.int64)
  return images.astype(np.float32) / np.float32(255), labels


def phase_autoattack(folder, checkpoint, n, eps):
  """The reference AutoAttack (pyautoattack, version='standard') on a PyTorch SmallCNN
  loaded strictly from ``checkpoint`` (taking [0, 1] pixels), first ``n`` test images."""
  import time
  import torch
  from pyautoattack import AutoAttack
  from safetensors.torch import load_file

  model = torch_models()["smallcnn"]()
  model.load_state_dict(load_file(checkpoint), strict=True)
  model.eval()
  x, y = fashion_mnist_test(n)
  x_t, y_t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(y)
  with torch.no_grad():
    clean = float((model(x_t).argmax(1) == y_t).float().mean())
  torch.manual_seed(0)
  start = time.time()
  adversary = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=0, device="cpu")
  x_adv, y_adv = adversary.run_standard_evaluation(x_t, y_t, batch_size=n)
  robust = y_adv.numpy() == y
  np.save(os.path.join(folder, "autoattack_reference_robust.npy"), robust)
  print(
    json.dumps(
      {
        "phase": "autoattack",
        "n": n,
        "eps": eps,
        "clean_accuracy": clean,
        "robust_accuracy": float(robust.mean()),
        "seconds": round(time.time() - start, 1),
        "max_linf": float((x_adv - x_t).abs().max()),
      }
    ),
    flush=True,
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--phase", choices=("make", "agad", "check", "all", "autoattack"), default="all"
  )
  parser.add_argument("--checkpoint", help="autoattack: a SmallCNN state dict (.safetensors)")
  parser.add_argument("--n", type=int, default=200, help="autoattack: first N test images")
  parser.add_argument("--eps", type=float, default=0.1, help="autoattack: L-inf radius")
  parser.add_argument("--dir", required=True)
  parser.add_argument("--archs", default=",".join(ARCHS))
  parser.add_argument("--tol", type=float, default=1e-4)
  args = parser.parse_args()
  archs = [a for a in args.archs.split(",") if a]
  unknown = [a for a in archs if a not in ARCHS]
  if unknown:
    parser.error(f"--archs: unknown {unknown}; known: {', '.join(ARCHS)}")
  os.makedirs(args.dir, exist_ok=True)
  if args.phase == "autoattack":
    return phase_autoattack(args.dir, args.checkpoint, args.n, args.eps)
  worst = 0.0
  if args.phase in ("make", "all"):
    phase_make(args.dir, archs)
  if args.phase in ("agad", "all"):
    worst = max(worst, phase_agad(args.dir, archs))
  if args.phase in ("check", "all"):
    worst = max(worst, phase_check(args.dir, archs))
  if worst > args.tol:
    print(f"FAIL: max abs logit difference {worst:.3g} > {args.tol:g}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
