"""The defense platform: modules found by name, DEFAULTS, plug-ins, norms, out-of-tree defenses."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from agad import checkpoint, data as data_lib
from agad import defenses, models
from agad.defenses import cas as cas_module
from agad.models.layers import MultiBranchBatchNorm
from agad.objectives import defaults
from tests.helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz"

# A throwaway defense: PGD-AT + a penalty on the adversarial pass's `embedding` tap, and
# a learnable per-channel scale plug-in at `features` (or wherever its config says).
TOY_DEFENSE = textwrap.dedent('''
    """A test defense written outside the repository."""
    import flax.linen as nn
    import jax.numpy as jnp
    import ml_collections

    from agad.objectives import base, defaults
    from agad.objectives.pgd_at import pgd_at

    NAME = __name__.rpartition(".")[2]  # config.objective.<NAME>: the file's name, so renaming is one step
    DEFAULTS = ml_collections.ConfigDict()
    DEFAULTS.weight = 0.01          # embedding-norm penalty weight (no paper: a test)
    DEFAULTS.site = "features"      # where the scale plug-in sits


    class Scale(nn.Module):
      @nn.compact
      def __call__(self, x, *, train, labels=None):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        self.sow("aux", "toy_scale_mean", jnp.mean(scale))
        return x * scale


    def plugins(config, num_classes):
      return {defaults.objective_config(config, NAME, DEFAULTS).site: Scale}


    def objective(model, config):
      cfg = defaults.objective_config(config, NAME, DEFAULTS)

      def terms(params, passes, batch, key, step):
        embedding = passes["adv"].taps["embedding"]
        value = cfg.weight * jnp.mean(jnp.sum(jnp.square(embedding), axis=-1))
        return value, {"toy_embedding_penalty": value}

      return base.add_terms(pgd_at(model, config), NAME, terms)
    ''')

# A defense that only swaps the norm layers (AFA's route to MultiBranchBatchNorm).
NORM_DEFENSE = textwrap.dedent("""
    import functools
    from agad.models.layers import MultiBranchBatchNorm
    from agad.objectives.pgd_at import pgd_at

    def norm(config):
      return functools.partial(MultiBranchBatchNorm, num_branches=3)

    def objective(model, config):
      return pgd_at(model, config)
    """)


@pytest.fixture()
def defense_dir(tmp_path):
  """A folder on agad.defenses' package path holding the throwaway modules."""
  folder = tmp_path / "my_defenses"
  folder.mkdir()
  (folder / "toy_def.py").write_text(TOY_DEFENSE)
  (folder / "toy_norm.py").write_text(NORM_DEFENSE)
  defenses.__path__.append(str(folder))
  yield folder
  defenses.__path__.remove(str(folder))
  for name in ("toy_def", "toy_norm", "renamed_def"):
    sys.modules.pop(f"agad.defenses.{name}", None)


def test_unknown_names_fail_with_the_names_that_exist():
  with pytest.raises(
    ValueError,
    match=r"unknown objective or defense 'fsrr' \(did you mean fsr\?\); known "
    r"objectives: .*cas.*trades.*transforms: again, awp, cas, fsr; a defense "
    r"outside agad/defenses: put the folder holding fsrr.py in AGAD_DEFENSES_PATH",
  ):
    defenses.find("fsrr")
  with pytest.raises(
    ValueError, match=r"unknown objective or defense 'zzz'; known"
  ):  # nothing close
    defenses.find("zzz")
  with pytest.raises(ValueError, match="'awp' in 'awp' is a transform"):
    defenses.parse("awp")
  with pytest.raises(ValueError, match="'mart' in 'trades\\+mart' cannot follow"):
    defenses.parse("trades+mart")
  # Infrastructure modules are not components.
  for name in ("base", "defaults", "_teacher", "_registry"):
    with pytest.raises(ValueError):
      defenses.find(name)
  n = defenses.names()
  assert {"standard", "pgd_at", "trades", "mart", "alp", "iat", "cas", "fsr", "again"} <= set(
    n["objectives"]
  )
  assert {"awp", "cas", "fsr", "again"} <= set(n["transforms"])


def test_defaults_reach_the_config_and_unknown_override_keys_fail():
  from configs import fashion_mnist

  c = fashion_mnist.get_config("smallcnn,trades+awp+cas")
  assert set(c.objective.keys()) == {"name", "trades", "awp", "cas"}
  assert c.objective.cas.weight == cas_module.DEFAULTS.weight == 2.0
  c.objective.cas.weight = 3.0  # what --config.objective.cas.weight=3 does
  assert defaults.objective_config(c, "cas", cas_module.DEFAULTS).weight == 3.0
  bad = ml_collections.ConfigDict({"objective": {"cas": {"wieght": 1.0}}})
  with pytest.raises(
    KeyError,
    match=r"unknown fields \['wieght'\]; known: \['attack_bn', 'random_start', "
    r"'sites', 'weight'\]",
  ):
    defaults.objective_config(bad, "cas", cas_module.DEFAULTS)
  # Every shipped component documents its fields: a comment on (or just above) each line.
  for name in defenses.names()["objectives"] + defenses.names()["transforms"]:
    module = defenses.find(name)
    source = open(module.__file__).read().splitlines()
    for field in getattr(module, "DEFAULTS", {}):
      at = [i for i, l in enumerate(source) if l.startswith(f"DEFAULTS.{field} =")]
      assert at and all("#" in source[i] or source[i - 1].lstrip().startswith("#") for i in at), (
        name,
        field,
      )


def test_plugins_merge_and_a_misspelt_or_doubled_site_is_an_error(defense_dir):
  info = data_lib.dataset_info(tiny_config().data)
  config = tiny_config("toy_def+cas", model="tiny_bn")
  config.objective.toy_def.site = "stem"
  model = defenses.build_model(config, info)
  assert set(model.plugins) == {"stem", "features"}
  config.objective.toy_def.site = "features"
  with pytest.raises(ValueError, match="'features' is requested by both 'toy_def' and 'cas'"):
    defenses.build_model(config, info)
  config = tiny_config("cas")
  config.objective.cas.sites = ("featurez",)
  with pytest.raises(ValueError, match="featurez"):
    defenses.build_model(config, info)
  # "The last unit of stage 1" resolves for any depth.
  config.objective.cas.sites = ("stage1.unit[-1]",)
  assert set(defenses.build_model(config, info).plugins) == {"stage1.unit0"}


def test_a_defense_norm_factory_reaches_the_model(defense_dir):
  config = tiny_config("toy_norm")
  info = data_lib.dataset_info(config.data)
  model = defenses.build_model(config, info)
  variables = model.init(jax.random.key(0), jnp.zeros((2,) + info.image_shape), train=False)
  assert set(variables["params"]["stem_bn"]) == {"branch0", "branch1", "branch2"}
  assert model.norm.func is MultiBranchBatchNorm
  with pytest.raises(ValueError, match="both 'toy_norm' and 'toy_norm'"):
    defenses.norm_for("toy_norm+toy_norm", config)


def test_a_renamed_file_is_a_new_defense_and_a_recorded_folder_is_found_again(defense_dir):
  """The example derives its config key from its file name (renaming is one step); the
  file and hash training records (``sources``) put its folder back on the path for a
  later command without AGAD_DEFENSES_PATH (``use_recorded``), and a vanished file is
  named, with the variable, in the error."""
  import hashlib
  from agad.defenses import _registry

  path = defense_dir / "renamed_def.py"
  path.write_text(TOY_DEFENSE)
  info = data_lib.dataset_info(tiny_config().data)
  config = tiny_config("renamed_def")
  assert config.objective.renamed_def.to_dict() == {"weight": 0.01, "site": "features"}
  config.objective.renamed_def.site = "stem"
  assert set(defenses.build_model(config, info).plugins) == {"stem"}
  recorded = defenses.sources("pgd_at+renamed_def")
  assert recorded["renamed_def"] == {
    "file": str(path),
    "out_of_tree": True,
    "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
  }
  assert recorded["pgd_at"]["out_of_tree"] is False
  folder = str(defense_dir)

  def forget():
    defenses.__path__.remove(folder)
    sys.modules.pop("agad.defenses.renamed_def", None)

  try:
    forget()
    with pytest.raises(
      ValueError, match="put the folder holding renamed_def.py in AGAD_DEFENSES_PATH"
    ):
      defenses.find("renamed_def")
    assert defenses.use_recorded(recorded) == [folder]
    assert defenses.find("renamed_def").__file__ == str(path)
    assert defenses.use_recorded(recorded) == []  # found already: nothing added
    forget()
    path.rename(defense_dir / "elsewhere.py")
    assert defenses.use_recorded(recorded) == []
    with pytest.raises(
      ValueError,
      match=f"trained with renamed_def from {path}, which is gone: put the "
      "folder that now holds renamed_def.py in AGAD_DEFENSES_PATH",
    ):
      defenses.find("renamed_def")
  finally:
    _registry._RECORDED.pop("renamed_def", None)
    if folder not in defenses.__path__:
      defenses.__path__.append(folder)


def test_adaptive_plugin_overrides_rebuild_declared_fields_only():
  config = tiny_config("cas")
  model = defenses.build_model(config, data_lib.dataset_info(config.data))
  st = defenses.with_plugin_overrides(model, straight_through=True)
  assert st.plugins["features"].keywords["straight_through"] is True
  assert model.plugins["features"].keywords.get("straight_through", False) is False
  with pytest.raises(ValueError, match="temperature"):
    defenses.with_plugin_overrides(model, temperature=1.0)
  bare = models.build_model("tiny_bn", num_classes=10, mean=(0.5,), std=(0.25,))
  with pytest.raises(ValueError, match="no plug-in"):
    defenses.with_plugin_overrides(bare, straight_through=True)


@pytest.mark.skipif(
  not os.path.exists(FMNIST),
  reason="Debian package dataset-fashion-mnist not installed (launch/env.sh installs it)",
)
@pytest.mark.slow
def test_an_out_of_tree_defense_trains_through_launch_train(tmp_path):
  """The whole contract: one file outside the repository, nothing edited, launch.train runs it."""
  folder = tmp_path / "defs"
  folder.mkdir()
  (folder / "toy_def.py").write_text(TOY_DEFENSE)
  tracked = subprocess.run(
    ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True
  ).stdout
  workdir = str(tmp_path / "run")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, AGAD_DEFENSES_PATH=str(folder))
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.train",
      "--config=configs/fashion_mnist.py:smallcnn,toy_def,smoke",
      "--config.objective.toy_def.weight=0.05",
      "--config.log_every_steps=2",
      "--config.stop_after_steps=4",
      "--config.checkpoint.every_steps=2",
      f"--workdir={workdir}",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  penalties = [
    l["train/toy_embedding_penalty"] for l in lines if "train/toy_embedding_penalty" in l
  ]
  assert len(penalties) == 2 and all(p > 0 for p in penalties)
  config = json.load(open(os.path.join(workdir, "config.json")))
  assert config["objective"]["toy_def"] == {"weight": 0.05, "site": "features"}
  raw, step = checkpoint.read_state(workdir, "latest")
  assert step == 4
  scale = raw["params"]["plugin_features"]["scale"]
  assert scale.shape == (64,) and not np.allclose(scale, 1.0)  # the plug-in trained
  changed = set(
    subprocess.run(
      ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True
    ).stdout.splitlines()
  ) - set(tracked.splitlines())
  assert not [l for l in changed if "toy_def" in l or "defenses/__init__" in l], (
    changed
  )  # nothing edited
  # The run says where its pieces came from and what to run next, without backend noise.
  module = str(folder / "toy_def.py")
  log = out.stderr
  assert f"toy_def: {module} (sha256 " in log and "radii: attack.eps=0.1 (25.5/255" in log
  assert "Unable to initialize backend" not in log and "tracked_metric" not in log
  steps = [l for l in log.splitlines() if "] step " in l]
  assert (
    "step 2/4 (stops early; schedule 24)" in steps[0] and "toy_embedding_penalty" in steps[0]
  ), steps
  assert (
    f"checkpoints: {workdir}/checkpoints (steps 2, 4; stopped at step 4 by stop_after_steps"
    in out.stdout
  )
  assert (
    f"python -m launch.evaluate --workdir={workdir} --step=latest --preset=table_aa" in out.stdout
  )
  launch = json.load(open(os.path.join(workdir, "run_record.json")))["launches"][-1]
  assert launch["defenses"]["toy_def"] == {
    "file": module,
    "out_of_tree": True,
    "sha256": hashlib.sha256(open(module, "rb").read()).hexdigest(),
  }
  # Evaluated later without AGAD_DEFENSES_PATH: the run record finds the module. This early-
  # stopped run has no validated checkpoint among two: --step=best says what to pass instead.
  from launch import common

  try:
    with pytest.raises(
      ValueError, match=r"^--step=best is invalid for .*has no 'best'\): pass --step=latest"
    ):
      common.check_evaluate_flags(workdir=workdir, step="best")
  finally:  # the check put the recorded folder on this process's path
    if str(folder) in defenses.__path__:
      defenses.__path__.remove(str(folder))
    sys.modules.pop("agad.defenses.toy_def", None)
  env.pop("AGAD_DEFENSES_PATH")
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.evaluate",
      f"--workdir={workdir}",
      "--preset=pgd",
      "--num_examples=4",
      "--step=latest",
    ],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"the run record's {module}" in out.stderr
  quote = out.stdout.strip().splitlines()[-1]
  assert (
    quote.startswith("number to quote: worst case ")
    and "a defense row needs --preset=table_aa" in quote
  )
  assert (
    '"worst-case": ' in out.stdout and "warning: n=4: the worst case's standard error" in out.stdout
  )


# A sixth defense with a CIFAR-10 recipe: one file (its recipe beside its objective).
RECIPE_DEFENSE = textwrap.dedent("""
    from agad.objectives.pgd_at import pgd_at

    def recipe(c, *, dataset, model, spec, smoke):
      if (dataset, model) == ("cifar10", "wrn28_10"):
        c.num_epochs = 7
        c.optim.boundaries = (3, 5)

    def objective(model, config):
      return pgd_at(model, config)
    """)


def test_a_defense_brings_its_recipe_and_configs_apply_it(defense_dir):
  from configs import cifar10, svhn

  (defense_dir / "toy_recipe.py").write_text(RECIPE_DEFENSE)
  try:
    c = cifar10.get_config("wrn28_10,toy_recipe")
    assert (c.num_epochs, tuple(c.optim.boundaries)) == (7, (3, 5))
    assert cifar10.get_config("wrn28_10,toy_recipe,smoke").num_epochs == 2  # smoke comes last
    other = cifar10.get_config("resnet18,toy_recipe")  # no recipe for this model
    assert (other.num_epochs, tuple(other.optim.boundaries)) == (100, (75, 90))
    assert svhn.get_config("wrn28_10,toy_recipe").num_epochs == 100  # nor for this dataset
    # As a transform's recipe would: every name of the spec is asked.
    assert cifar10.get_config("wrn28_10,toy_recipe+awp").num_epochs == 7
  finally:
    sys.modules.pop("agad.defenses.toy_recipe", None)
