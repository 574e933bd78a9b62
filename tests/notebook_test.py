"""notebooks/attention_maps.ipynb and launch.attention on smoke checkpoints of real
Fashion-MNIST: PGD-AT (the session's shared ``smoke_workdir``, conftest.py) and standard
training (~10 s to train, here)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.smoke import REPO, copy_workdir, launch_env, needs_data

NOTEBOOK = os.path.join(REPO, "notebooks", "attention_maps.ipynb")


def _env(**extra):
  return launch_env(**extra)


def _run(args, **kw):
  return subprocess.run(
    [sys.executable, "-m", *args], cwd=REPO, env=_env(), capture_output=True, text=True, **kw
  )


@pytest.fixture(scope="module")
def smoke_runs(smoke_workdir, tmp_path_factory):
  """``{"pgd_at": workdir, "standard": workdir}`` of SmallCNN smoke runs (read-only: the
  pgd_at one is shared by the whole session)."""
  workdir = str(tmp_path_factory.mktemp("attention_runs") / "standard")
  out = _run(
    [
      "launch.train",
      "--config=configs/fashion_mnist.py:smallcnn,standard,smoke",
      f"--workdir={workdir}",
    ],
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return {"pgd_at": smoke_workdir, "standard": workdir}


def test_notebook_is_stripped():
  import nbformat

  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)
  assert "AGAD_NOTEBOOK_WORKDIR" in "".join(c.source for c in code)


@needs_data
@pytest.mark.slow
def test_notebook_runs_on_a_smoke_checkpoint(smoke_runs, monkeypatch):
  import nbclient
  import nbformat

  nb = nbformat.read(NOTEBOOK, as_version=4)
  # The kernel inherits this process's environment.
  for key, value in _env(
    AGAD_NOTEBOOK_WORKDIR=smoke_runs["pgd_at"],
    AGAD_NOTEBOOK_COMPARE=smoke_runs["standard"],
    AGAD_NOTEBOOK_NUM_IMAGES="8",
  ).items():
    monkeypatch.setenv(key, value)
  client = nbclient.NotebookClient(
    nb,
    timeout=300,
    kernel_name="python3",
    resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}},
  )
  client.execute()  # raises CellExecutionError with the traceback if a cell fails
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
  assert f"agad from {os.path.join(REPO, 'agad', '__init__.py')}" in text
  assert "smallcnn / pgd_at" in text and "PGD-20 eps 0.1" in text
  assert "stage2.pre_pool {'grad_cam': (4, 8, 8)" in text
  assert "pgd_at: clean acc" in text and "standard: clean acc" in text
  # examples, distributions, the 8x8 site, side by side, both distributions.
  assert len(images) == 5, text


@needs_data
@pytest.mark.slow
def test_launch_attention_writes_figures_and_statistics(smoke_runs, tmp_path):
  # A private copy of the shared run, named pgd_at as the figures and statistics are
  # labelled by the workdir's name.
  workdir = copy_workdir(smoke_runs["pgd_at"], tmp_path / "pgd_at")
  # Two comparison workdirs (the same run twice: labels standard, standard_2).
  out = _run(
    [
      "launch.attention",
      f"--workdir={workdir}",
      f"--compare={smoke_runs['standard']},{smoke_runs['standard']}",
      "--num_images=12",
      "--site=stage2.pre_pool",
    ],
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  # A comparison gets its own folder beside the first run, not inside it.
  folder = str(tmp_path / "attention_pgd_at_vs_standard_vs_standard_2")
  assert not os.path.exists(os.path.join(workdir, "eval", "attention"))
  stats = json.load(open(os.path.join(folder, "attention_stage2_pre_pool.json")))
  import matplotlib.image

  for name in (
    "examples_pgd_at_stage2_pre_pool",
    "examples_standard_stage2_pre_pool",
    "distributions_stage2_pre_pool",
    "side_by_side_stage2_pre_pool",
  ):
    png = matplotlib.image.imread(os.path.join(folder, name + ".png"))
    assert png.ndim == 3 and min(png.shape[:2]) > 200 and png.std() > 0.01, name
  assert stats["num_images"] == 12 and set(stats["runs"]) == {"pgd_at", "standard", "standard_2"}
  assert (
    stats["runs"]["standard"]["all"] == stats["runs"]["standard_2"]["all"]
  )  # same run, same key
  for name, run in stats["runs"].items():
    assert run["objective"] == name.removesuffix("_2") and run["model"] == "smallcnn"
    assert run["attack"] == {
      "name": "pgd-20",
      "norm": "linf",
      "eps": 0.1,
      "step_size": 0.01,
      "steps": 20,
      "seed": 0,
      "bn": "eval",
    }
    assert run["kinds"] == ["grad_cam", "channel_mean"]  # no CAM: SmallCNN flattens
    assert 0.0 <= run["adversarial_accuracy"] <= run["clean_accuracy"] <= 1.0
    assert sum(c["n"] for c in run["per_class"].values()) == 12
    for kind in run["kinds"]:
      block = run["all"][kind]
      for key in ("asc_clean", "asc_adv"):
        assert block[key]["n"] == 12 and 0.0 <= block[key]["min"] <= block[key]["max"] <= 1.0
        # ASC counts elements of an 8x8 map: multiples of 1/64.
        assert abs(block[key]["max"] * 64 - round(block[key]["max"] * 64)) < 1e-4
      for metric in ("l1", "l2", "cosine", "iou"):
        s = block["shift"][metric]
        assert 0.0 <= s["min"] <= s["mean"] <= s["max"] <= 1.0 + 1e-6, (name, kind, metric)
      assert block["shift"]["l1"]["max"] > 0.0  # PGD moves the maps
  # The per-class statistics agree with the overall ones (weighted means).
  run = stats["runs"]["pgd_at"]
  per = run["per_class"].values()
  mean = sum(c["n"] * c["grad_cam"]["asc_clean"]["mean"] for c in per) / 12
  np.testing.assert_allclose(mean, run["all"]["grad_cam"]["asc_clean"]["mean"], rtol=1e-6)
