"""Clean vs adversarial attention: maps, ASC and attention shift on test images, figures.

The shared engine of ``launch/attention.py`` and ``notebooks/attention_maps.ipynb``:

    images, labels = test_images(splits, 16)
    adv = adversarial(logits_fn, images, labels, key, eps=0.1, step_size=0.01, steps=20)
    s = study(model, variables, images, labels, adv, site="features")
    summary(s, class_names)            # JSON-ready ASC / shift statistics
    plot_examples(s); plot_distributions(s); plot_side_by_side({"std": s0, "at": s1})

Which class a map explains (``explain``): ``"label"`` (default) the true label for both
the clean and the adversarial input, so a shift is the attention for the same class
moving with the input; ``"predicted"`` each input's own prediction (AGAIN's inference
setting; an attack that flips the prediction then also switches the class explained).
ASC (AGAIN Eq. 2) is computed per map kind on the raw maps; shifts on min-max
normalised maps (:func:`agad.attention.attention_shift`). Everything returned is numpy.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from agad.attacks import iterative
from agad.attention import functional as maps_lib
from agad.attention import model as model_lib
from agad.data import pipeline

EXPLAIN = ("label", "predicted")
CLASS_NAMES = {
  "fashion_mnist": (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
  ),
  "cifar10": (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
  ),
}


class Study(NamedTuple):
  """Maps and statistics of one model on N images (numpy; maps ``[N, h, w]``)."""

  site: str
  kinds: tuple[str, ...]
  explain: str
  images: np.ndarray  # [N, H, W, C] clean, in [0, 1]
  adv: np.ndarray  # [N, H, W, C] adversarial
  labels: np.ndarray  # [N]
  pred_clean: np.ndarray  # [N]
  pred_adv: np.ndarray  # [N]
  clean: dict  # {kind: [N, h, w]}
  adversarial: dict  # {kind: [N, h, w]}
  asc: dict  # {kind: {"clean": [N], "adv": [N]}}
  shift: dict  # {kind: {metric: [N]}}
  lam: float
  top_frac: float


def class_names(dataset: str, num_classes: int) -> tuple[str, ...]:
  """Readable class names where known, else ``("0", "1", ...)``."""
  names = CLASS_NAMES.get(dataset)
  return names if names and len(names) == num_classes else tuple(map(str, range(num_classes)))


def run_labels(workdirs: Sequence[str]) -> list[str]:
  """Short, distinct labels: the workdirs' basenames without their common ``_``-prefix
  (``fashion_mnist_smallcnn_pgd_at`` vs ``..._standard`` -> ``pgd_at``, ``standard``)."""
  names = [os.path.basename(os.path.normpath(w)) or "run" for w in workdirs]
  if len(names) > 1:
    prefix = os.path.commonprefix(names)
    prefix = prefix[: prefix.rfind("_") + 1]
    if prefix and all(len(n) > len(prefix) for n in names):
      names = [n[len(prefix) :] for n in names]
  out = []
  for name in names:
    while name in out:
      name += "_2"
    out.append(name)
  return out


def test_images(splits, num_images: int, *, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
  """The first ``num_images`` images of a split: ``([N, H, W, C] float32 in [0, 1], [N] int32)``."""
  source = getattr(splits, split)
  n = min(int(num_images), len(source))
  if n < 1:
    raise ValueError(
      f"num_images={num_images!r}: need at least one image (the {split} split has {len(source)})"
    )
  batch = pipeline.read_batch(source, np.arange(n))
  return batch["image"].astype(np.float32) / np.float32(255), batch["label"].astype(np.int32)


def adversarial(
  logits_fn,
  images,
  labels,
  key,
  *,
  eps: float,
  step_size: float,
  steps: int = 20,
  norm: str = "linf",
) -> np.ndarray:
  """PGD-``steps`` (CE, uniform random start) on an eval-mode ``logits_fn``: ``[N, H, W, C]``."""
  adv = iterative.pgd(
    logits_fn,
    jnp.asarray(images),
    jnp.asarray(labels),
    key,
    eps=eps,
    step_size=step_size,
    steps=steps,
    norm=norm,
  )
  return np.asarray(adv)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("site", "kinds"))
def _maps_and_logits(model, variables, images, classes, *, site, kinds):
  return model_lib.maps_and_logits(model, variables, images, classes, site=site, kinds=kinds)


def _batched_maps(model, variables, images, classes, *, site, kinds, batch_size):
  out, logits = [], []
  for i in range(0, len(images), batch_size):
    k = None if classes is None else jnp.asarray(classes[i : i + batch_size])
    m, z = _maps_and_logits(
      model, variables, jnp.asarray(images[i : i + batch_size]), k, site=site, kinds=kinds
    )
    out.append(m)
    logits.append(z)
  maps = {k: np.concatenate([np.asarray(o[k]) for o in out]) for k in kinds}
  return maps, np.concatenate([np.asarray(z) for z in logits])


def default_kinds(model, variables, input_shape: Sequence[int], site: str) -> tuple[str, ...]:
  """``DEFAULT_KINDS`` without ``"cam"`` where the site is not followed by GAP + linear."""
  cam = model_lib.supports_cam(model, variables, input_shape, site=site)
  return tuple(k for k in model_lib.DEFAULT_KINDS if k != "cam" or cam)


def study(
  model,
  variables,
  images,
  labels,
  adv,
  *,
  site: str = "features",
  kinds: Sequence[str] | None = None,
  explain: str = "label",
  lam: float = 0.5,
  top_frac: float = 0.2,
  batch_size: int = 64,
) -> Study:
  """Eval-mode maps of clean and adversarial images, their ASC and their shift.

  Args:
    model, variables: an agad backbone and ``{'params', 'batch_stats'?}``.
    images, adv: ``[N, H, W, C]`` in [0, 1]; labels ``[N]``.
    site: any site or unit alias. kinds: None = :func:`default_kinds`.
    explain: ``"label"`` or ``"predicted"`` (module docstring).
    lam: ASC threshold (AGAIN: 0.5). top_frac: the ``"iou"`` shift's top fraction.
  """
  if explain not in EXPLAIN:
    raise ValueError(f"explain={explain!r} is not one of {EXPLAIN}")
  images, adv = np.asarray(images, np.float32), np.asarray(adv, np.float32)
  labels = np.asarray(labels)
  if images.shape != adv.shape or labels.shape != images.shape[:1]:
    raise ValueError(
      f"images {images.shape}, adversarial images {adv.shape} and labels "
      f"{labels.shape} must be [N, H, W, C], [N, H, W, C] and [N]"
    )
  site = model_lib.resolve(model, site, images.shape[1:])
  kinds = default_kinds(model, variables, images.shape[1:], site) if kinds is None else tuple(kinds)
  classes = labels if explain == "label" else None
  kw = dict(site=site, kinds=kinds, batch_size=batch_size)
  clean, z_clean = _batched_maps(model, variables, images, classes, **kw)
  advm, z_adv = _batched_maps(model, variables, adv, classes, **kw)
  asc = {
    k: {
      "clean": np.asarray(maps_lib.asc(clean[k], lam=lam)),
      "adv": np.asarray(maps_lib.asc(advm[k], lam=lam)),
    }
    for k in kinds
  }
  shift = {
    k: {
      m: np.asarray(maps_lib.attention_shift(clean[k], advm[k], metric=m, top_frac=top_frac))
      for m in maps_lib.SHIFT_METRICS
    }
    for k in kinds
  }
  return Study(
    site,
    kinds,
    explain,
    images,
    adv,
    labels,
    z_clean.argmax(-1),
    z_adv.argmax(-1),
    clean,
    advm,
    asc,
    shift,
    float(lam),
    float(top_frac),
  )


def _stats(values: np.ndarray) -> dict:
  values = np.asarray(values, np.float64)
  if values.size == 0:
    return {"n": 0}
  return {
    "n": int(values.size),
    "mean": float(values.mean()),
    "std": float(values.std()),
    "median": float(np.median(values)),
    "min": float(values.min()),
    "max": float(values.max()),
  }


def summary(s: Study, names: Sequence[str] | None = None) -> dict:
  """JSON-ready statistics: accuracies, and per kind ASC (clean/adv) and shift per metric,
  over all images and per true class (``names``: class names, default the indices)."""
  num_classes = int(max(s.labels.max(), s.pred_clean.max(), s.pred_adv.max())) + 1
  names = list(names) if names is not None else [str(c) for c in range(num_classes)]

  def block(idx):
    out = {}
    for k in s.kinds:
      out[k] = {
        "asc_clean": _stats(s.asc[k]["clean"][idx]),
        "asc_adv": _stats(s.asc[k]["adv"][idx]),
        "shift": {m: _stats(v[idx]) for m, v in s.shift[k].items()},
      }
    return out

  everything = np.arange(len(s.labels))
  per_class = {}
  for c in np.unique(s.labels):
    idx = np.flatnonzero(s.labels == c)
    per_class[names[int(c)] if int(c) < len(names) else str(int(c))] = {
      "n": int(idx.size),
      **block(idx),
    }
  return {
    "site": s.site,
    "kinds": list(s.kinds),
    "explain": s.explain,
    "asc_lambda": s.lam,
    "iou_top_frac": s.top_frac,
    "num_images": int(len(s.labels)),
    "clean_accuracy": float(np.mean(s.pred_clean == s.labels)),
    "adversarial_accuracy": float(np.mean(s.pred_adv == s.labels)),
    "all": block(everything),
    "per_class": per_class,
    "constant_maps": {
      k: {
        "clean": int(constant_maps(s.clean[k]).sum()),
        "adv": int(constant_maps(s.adversarial[k]).sum()),
      }
      for k in s.kinds
    },
  }


def constant_maps(maps) -> np.ndarray:
  """``[N]`` bool: maps with no contrast (all zero, or flat): nothing to draw, ASC 0.
  Grad-CAM is all zero where the explained class's gradient at the site vanishes (every
  ReLU after it off, or a saturated softmax)."""
  m = np.asarray(maps, np.float64).reshape(len(maps), -1)
  return (m.max(axis=1) - m.min(axis=1)) <= maps_lib.EPS


def legend(s: Study) -> str:
  """The line under every figure: what the colours, ASC and the L1 shift mean, and how many
  maps had nothing to draw."""
  flat = {
    k: int(constant_maps(s.clean[k]).sum() + constant_maps(s.adversarial[k]).sum()) for k in s.kinds
  }
  note = "; ".join(
    f"{n} of {2 * len(s.labels)} {k} maps are constant (all zero: no gradient reaches "
    "the site for that class), drawn without colour"
    for k, n in flat.items()
    if n
  )
  return (
    f"Colours: each map min-max normalised per image (0 blue, 1 red). ASC: the fraction of map "
    f"elements above {s.lam:g} x its maximum (AGAIN Eq. 2; lower = more concentrated; 0 for an "
    f"all-zero map). L1: the mean |clean - adversarial| of the two normalised maps (0 = unchanged, "
    f"1 = moved everywhere). Maps explain the {s.explain} class." + (f"\n{note}." if note else "")
  )


# ------------------------------------------------------------------------------ figures


def _plt():
  import matplotlib.pyplot as plt  # imported on first use: the maths needs no matplotlib

  return plt


def _gray(image: np.ndarray) -> np.ndarray:
  return image[..., 0] if image.shape[-1] == 1 else image


def _overlay(ax, image, m, title=None):
  """The image in gray with the map (upsampled bilinearly, min-max normalised) over it."""
  h, w = image.shape[:2]
  up = np.asarray(
    maps_lib.normalize_maps(maps_lib.upsample(jnp.asarray(m)[None], (h, w)), "minmax")
  )[0]
  ax.imshow(_gray(image), cmap="gray", vmin=0, vmax=1)
  ax.imshow(up, cmap="jet", alpha=0.45, vmin=0, vmax=1)
  ax.set_xticks([])
  ax.set_yticks([])
  if title:
    ax.set_title(title, fontsize=7)


def _colorbar(fig, axes, s: Study):
  """A colour bar for the overlaid maps, and the legend line at the bottom."""
  import matplotlib as mpl  # on first use, as _plt: the maths needs no matplotlib

  sm = mpl.cm.ScalarMappable(cmap="jet", norm=mpl.colors.Normalize(0, 1))
  fig.colorbar(
    sm, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01, label="map (per-image min-max)"
  )
  fig.text(0.01, 0.002, legend(s), fontsize=7, ha="left", va="bottom", wrap=True)


def _flat(m) -> str:
  return " (all zero)" if constant_maps(np.asarray(m)[None])[0] else ""


def _image(ax, image, title):
  ax.imshow(_gray(image), cmap="gray", vmin=0, vmax=1)
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_title(title, fontsize=7)


def plot_examples(
  s: Study, names: Sequence[str] | None = None, *, max_images: int = 8, title: str = ""
):
  """Per image: input, adversarial, then each kind clean | adversarial overlaid (a Figure)."""
  plt = _plt()
  n = min(max_images, len(s.labels))
  cols = 2 + 2 * len(s.kinds)
  fig, axes = plt.subplots(
    n, cols, figsize=(1.5 * cols + 0.6, 1.6 * n + 0.7), squeeze=False, layout="constrained"
  )
  name = (lambda c: names[int(c)]) if names is not None else str
  for i in range(n):
    _image(axes[i, 0], s.images[i], f"{name(s.labels[i])}\nclean pred {name(s.pred_clean[i])}")
    _image(
      axes[i, 1],
      s.adv[i],
      f"adversarial\npred {name(s.pred_adv[i])} (clean {name(s.pred_clean[i])})",
    )
    for j, k in enumerate(s.kinds):
      _overlay(
        axes[i, 2 + 2 * j],
        s.images[i],
        s.clean[k][i],
        f"{k} clean{_flat(s.clean[k][i])}\nASC {s.asc[k]['clean'][i]:.2f}",
      )
      _overlay(
        axes[i, 3 + 2 * j],
        s.adv[i],
        s.adversarial[k][i],
        f"{k} adv{_flat(s.adversarial[k][i])}\nASC {s.asc[k]['adv'][i]:.2f} L1 {s.shift[k]['l1'][i]:.2f}",
      )
  fig.suptitle(title or f"site {s.site} (maps explain the {s.explain} class)", fontsize=9)
  _colorbar(fig, axes, s)
  fig.get_layout_engine().set(rect=(0, 0.06, 1, 0.94))  # room for the legend line
  return fig


def plot_distributions(
  studies: Mapping[str, Study],
  names: Sequence[str] | None = None,
  *,
  kind: str = "grad_cam",
  metric: str = "l1",
):
  """Box plots per true class: ASC clean / adv and the ``metric`` shift, one row per study."""
  plt = _plt()
  rows = len(studies)
  fig, axes = plt.subplots(
    rows, 3, figsize=(13, 2.8 * rows + 0.6), squeeze=False, layout="constrained"
  )
  for r, (label, s) in enumerate(studies.items()):
    # Every class, with its count: a class absent from the first N images shows as empty.
    k = len(names) if names is not None else int(max(s.labels.max(), s.pred_clean.max())) + 1
    classes = np.arange(k)
    ticks = [
      f"{names[c] if names is not None else c} ({int(np.sum(s.labels == c))})" for c in classes
    ]
    panels = [
      (s.asc[kind]["clean"], f"{label}: ASC ({kind}), clean"),
      (s.asc[kind]["adv"], f"{label}: ASC ({kind}), adversarial"),
      (s.shift[kind][metric], f"{label}: shift {metric} ({kind})"),
    ]
    for ax, (values, title) in zip(axes[r], panels):
      ax.boxplot([values[s.labels == c] for c in classes], tick_labels=ticks)
      ax.set_title(title, fontsize=8)
      ax.tick_params(axis="x", labelrotation=60, labelsize=7)
      ax.set_ylim(-0.05, 1.05)
  first = next(iter(studies.values()))
  fig.text(
    0.01,
    0.002,
    "Per true class (images in brackets). " + legend(first).split(" Maps explain")[0],
    fontsize=7,
    ha="left",
    va="bottom",
    wrap=True,
  )
  fig.get_layout_engine().set(rect=(0, 0.06, 1, 0.94))
  return fig


def plot_side_by_side(
  studies: Mapping[str, Study],
  names: Sequence[str] | None = None,
  *,
  kind: str = "grad_cam",
  max_images: int = 6,
):
  """Per image and per study (e.g. standard vs PGD-AT): adversarial input, ``kind`` map
  clean and adversarial overlaid, with ASC and L1 shift (a Figure)."""
  plt = _plt()
  first = next(iter(studies.values()))
  n = min(max_images, len(first.labels))
  cols = 1 + 3 * len(studies)
  fig, axes = plt.subplots(
    n, cols, figsize=(1.5 * cols + 0.6, 1.6 * n + 0.7), squeeze=False, layout="constrained"
  )
  name = (lambda c: names[int(c)]) if names is not None else str
  for i in range(n):
    _image(axes[i, 0], first.images[i], name(first.labels[i]))
    for j, (label, s) in enumerate(studies.items()):
      c = 1 + 3 * j
      _image(
        axes[i, c],
        s.adv[i],
        f"{label} adv\npred {name(s.pred_adv[i])} (clean {name(s.pred_clean[i])})",
      )
      _overlay(
        axes[i, c + 1],
        s.images[i],
        s.clean[kind][i],
        f"{label} clean{_flat(s.clean[kind][i])}\nASC {s.asc[kind]['clean'][i]:.2f}",
      )
      _overlay(
        axes[i, c + 2],
        s.adv[i],
        s.adversarial[kind][i],
        f"{label} adv{_flat(s.adversarial[kind][i])}\nASC {s.asc[kind]['adv'][i]:.2f} "
        f"L1 {s.shift[kind]['l1'][i]:.2f}",
      )
  fig.suptitle(f"{kind} at {first.site}: " + " vs ".join(studies), fontsize=9)
  _colorbar(fig, axes, first)
  fig.get_layout_engine().set(rect=(0, 0.06, 1, 0.94))
  return fig
