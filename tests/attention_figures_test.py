"""The attention figures on a hand-made study (no model): colour bar, the clean prediction
beside the adversarial one, the legend line (ASC, L1, all-zero maps), every class in the
distribution plot."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402

from agad.attention import study as study_lib  # noqa: E402

NAMES = (
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
)


def _study(n=3):
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(n, 8, 8, 1)).astype(np.float32)
  clean = rng.uniform(size=(n, 4, 4)).astype(np.float32)
  adv = clean.copy()
  adv[1] = 0.0  # an all-zero adversarial map (no gradient at the site for that class)
  labels = np.array([0, 0, 2])[:n]
  return study_lib.Study(
    "features",
    ("grad_cam",),
    "label",
    images,
    images,
    labels,
    np.array([0, 1, 2])[:n],
    np.array([3, 1, 2])[:n],
    {"grad_cam": clean},
    {"grad_cam": adv},
    {"grad_cam": {"clean": np.full(n, 0.5), "adv": np.array([0.25, 0.0, 0.5])[:n]}},
    {"grad_cam": {m: np.full(n, 0.1) for m in ("l1", "l2", "cosine", "iou")}},
    0.5,
    0.2,
  )


def _texts(fig):
  return [t.get_text() for ax in fig.axes for t in [ax.title, ax.xaxis.label, ax.yaxis.label]] + [
    t.get_text() for t in fig.texts
  ]


def test_example_and_side_by_side_figures_explain_themselves():
  s = _study()
  assert study_lib.constant_maps(s.adversarial["grad_cam"]).tolist() == [False, True, False]
  legend = study_lib.legend(s)
  assert "ASC: the fraction of map elements above 0.5 x its maximum (AGAIN Eq. 2" in legend
  assert "L1: the mean |clean - adversarial| of the two normalised maps" in legend
  assert legend.endswith(
    "1 of 6 grad_cam maps are constant (all zero: no gradient reaches the site "
    "for that class), drawn without colour."
  )
  for fig in (
    study_lib.plot_examples(s, NAMES),
    study_lib.plot_side_by_side({"a": s, "b": s}, NAMES),
  ):
    texts = _texts(fig)
    assert "map (per-image min-max)" in texts  # the colour bar
    assert legend in texts
    assert any(t.endswith("pred Dress (clean T-shirt/top)") for t in texts), texts
    assert any(t.startswith(("grad_cam adv (all zero)", "b adv (all zero)")) for t in texts), texts
    fig.canvas.draw()  # the layout fits (no exception)
  assert study_lib.summary(s, NAMES)["constant_maps"] == {"grad_cam": {"clean": 0, "adv": 1}}


def test_the_distribution_plot_has_every_class_with_its_count():
  fig = study_lib.plot_distributions({"run": _study()}, NAMES)
  ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
  assert ticks == ["T-shirt/top (2)", "Trouser (0)", "Pullover (1)"] + [
    f"{c} (0)" for c in NAMES[3:]
  ]
  assert fig.texts[-1].get_text().startswith("Per true class (images in brackets). Colours:")
