"""Dev tool: snapshot every base objective's adversarial batch, loss, gradients, BN state
and metrics on a fixed batch, so two revisions can be compared bitwise.

    git worktree add ../agad-old <rev>
    (cd ../agad-old && PYTHONPATH=. python "$OLDPWD/tools/loss_snapshot.py" ../old.npz)
    PYTHONPATH=. python tools/loss_snapshot.py ../new.npz
    python tools/loss_snapshot.py --compare ../old.npz ../new.npz

Works on revisions before the defense platform (``agad.objectives.build_objective``,
3-tuple loss aux) and after it (``agad.defenses``, ``LossAux``).
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

SPECS = [
  "standard",
  "pgd_at",
  "trades",
  "mart",
  "alp",
  "iat",
  "cas",
  "trades+awp",
  "cas+awp",
  "pgd_at+awp",
]
# Defenses (revisions from f0b198c on): compared only when both snapshots have them.
SPECS_DEFENSES = ["again", "mart+again", "pgd_at+cas", "again+awp", "fsr", "trades+fsr"]
# Defenses that replace the backbone's norm layers (AFA), on the BN model only: compared when
# both snapshots have them.
SPECS_NORM = ["afa", "afa_stage2"]


def snapshot(out_path: str) -> None:
  import jax
  import jax.numpy as jnp

  jax.config.update("jax_num_cpu_devices", 1)
  import agad
  from agad import models
  from configs import fashion_mnist

  # Decide by the checked-out tree (an editable install elsewhere can still resolve
  # agad.defenses through its import hook).
  if os.path.isdir(os.path.join(os.path.dirname(agad.__file__), "defenses")):
    from agad import defenses as registry

    specs = SPECS + SPECS_DEFENSES + (SPECS_NORM if hasattr(registry, "norm_hook_for") else [])
  else:  # Before the defense platform.
    from agad import objectives as registry

    specs = SPECS
  res = {}
  for model_name in ("smallcnn", "tiny_bn"):
    for spec in specs:
      if spec in SPECS_NORM and model_name == "smallcnn":  # no BN layer to replace
        continue
      cfg = fashion_mnist.get_config(f"smallcnn,{spec},smoke")
      cfg.attack.steps = 2
      if spec == "afa_stage2":  # stage II refuses a config that does not start from stage I.
        cfg.init.workdir, cfg.init.freeze = "stage1", r"^(?!(.*/)?wg/)"
      plugins = registry.plugins_for(spec, cfg, 10)
      kwargs = {}
      if spec in SPECS_NORM:
        kwargs = {"norm": registry.norm_for(spec, cfg)}
        hook = registry.norm_hook_for(spec, cfg)
        kwargs.update({"norm_hook": hook} if hook is not None else {})
      model = models.build_model(
        model_name, num_classes=10, mean=(0.5,), std=(0.25,), plugins=plugins or None, **kwargs
      )
      obj = registry.build_objective(spec, model, cfg)
      rng = np.random.RandomState(0)
      batch = {
        "image": jnp.asarray(rng.rand(16, 28, 28, 1), jnp.float32),
        "label": jnp.asarray(rng.randint(0, 10, 16), jnp.int32),
      }
      variables = model.init(jax.random.key(1), batch["image"], train=False, labels=batch["label"])
      params = jax.tree.map(
        lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape), variables["params"]
      )
      state = {
        k: v
        for k, v in variables.items()
        if k not in ("params", "intermediates", "aux", "perturbations")
      }
      aux_state = obj.init(jax.random.key(2), {"params": params, **state}, batch)
      adv = obj.generate(params, state, aux_state, batch, jax.random.key(3), jnp.int32(5))

      def loss(p):
        value, aux = obj.loss(p, state, aux_state, batch, adv, jax.random.key(4), jnp.int32(5))
        return value, tuple(aux)[:3]  # (model_state, aux_state, metrics) at every revision

      (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
      tag = f"{model_name}/{spec}"
      res[f"{tag}/adv"], res[f"{tag}/loss"] = np.asarray(adv), np.asarray(value)
      for i, leaf in enumerate(jax.tree.leaves(grads)):
        res[f"{tag}/grad{i}"] = np.asarray(leaf)
      for i, leaf in enumerate(jax.tree.leaves(aux[0])):
        res[f"{tag}/model_state{i}"] = np.asarray(leaf)
      for k, m in aux[2].items():
        res[f"{tag}/metric_{k}"] = np.asarray(m)
      print(tag, float(value))
  np.savez(out_path, **res)


def compare(a_path: str, b_path: str) -> int:
  a, b = np.load(a_path), np.load(b_path)
  only_a, only_b = sorted(set(a.files) - set(b.files)), sorted(set(b.files) - set(a.files))
  common = sorted(set(a.files) & set(b.files))
  differ = [k for k in common if not np.array_equal(a[k], b[k])]
  print(
    f"{len(common)} arrays compared; differ: {differ}; only in {a_path}: {only_a}; only in {b_path}: {only_b}"
  )
  return 1 if differ else 0


if __name__ == "__main__":
  if sys.argv[1] == "--compare":
    sys.exit(compare(sys.argv[2], sys.argv[3]))
  snapshot(sys.argv[1])
