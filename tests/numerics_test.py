"""Numerics that hold on any CPU: no expression whose value depends on one compilation.

AGAIN's label gathers (``W[y]``, ``W[y']``) had NaN gradients for valid labels in two
XLA:CPU compilations of the train step (YNN fusions off; cheap-compile mode): the NaN came
from the scatter-add behind the gathers' gradients (and the gathers' NaN fill mode).
agad's losses and plug-ins pick label rows and entries by one-hot products
(``agad.attacks.losses.rows`` / ``pick``), so a train step has no scatter on floats and no
gather in NaN-fill mode; these tests keep it so (docs/results/numerics.md).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.extend import core as jex_core

from agad.attacks import losses
from agad.defenses import again as again_lib
from agad.defenses import agkd_bml
from agad.objectives.mart import mart_loss
from agad.training import loop
from agad.training import step as step_lib
from tests.helpers import assert_close, tiny_config
from tests.smoke import load_tool

# Every objective and composition a Fashion-MNIST smoke run trains without a teacher: the
# specs of tools/numerics_sweep.py except those that first train a teacher or stage I.
_SWEEP = load_tool("numerics_sweep")
SPECS = tuple(s for s in _SWEEP.SPECS if s not in _SWEEP.PREREQ)


def _nan_prone_gathers_and_scatters(jaxpr, found):
  """Appends ``(primitive, dtype)`` of every gather in NaN-fill mode and every scatter into
  floats (a gather's gradient), recursively through sub-programs."""
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name.startswith(("gather", "scatter")):
      floating = jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.floating)
      if "FILL_OR_DROP" in str(eqn.params.get("mode")) or (name.startswith("scatter") and floating):
        found.append((name, str(eqn.invars[0].aval)))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(sub, jex_core.ClosedJaxpr):
          _nan_prone_gathers_and_scatters(sub.jaxpr, found)
        elif isinstance(sub, jex_core.Jaxpr):
          _nan_prone_gathers_and_scatters(sub, found)
  return found


@pytest.mark.parametrize("spec", SPECS)
def test_no_train_step_scatters_floats_or_gathers_in_nan_fill_mode(tmp_path, spec):
  trainer = loop.Trainer(tiny_config(spec), str(tmp_path))
  state = jax.eval_shape(trainer.initial_state)
  train_step = step_lib.make_train_step(trainer.exp.objective, trainer.tx, ema_decay=0.0)
  batch = {"image": jnp.zeros((16, 8, 8, 1)), "label": jnp.zeros((16,), jnp.int32)}
  jaxpr = jax.make_jaxpr(train_step)(state, batch, trainer.frozen)
  assert _nan_prone_gathers_and_scatters(jaxpr.jaxpr, []) == []


def test_label_picks_of_agkd_bml_and_mart_are_gather_free():
  """AGKD-BML's MART term (its step needs a teacher, so it is not in SPECS) and MART's loss."""
  logits = jax.random.normal(jax.random.key(0), (4, 10))
  labels = jnp.array([0, 9, 3, 9])
  for fn in (
    lambda a: agkd_bml.mart_term(logits, a, labels, beta=6.0),
    lambda a: mart_loss(logits, a, labels, beta=6.0),
  ):
    jaxpr = jax.make_jaxpr(jax.grad(fn))(logits)
    assert _nan_prone_gathers_and_scatters(jaxpr.jaxpr, []) == []


class ASEWeightsAtTheBoundaryTest(parameterized.TestCase):
  """``ase_weights`` at the first and last class (the rows next to the gather's bounds):
  exact rows, finite gradients, jitted and not."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_boundary_labels_give_exact_rows_and_finite_gradients(self):
    kernel = jax.random.normal(jax.random.key(0), (6, 4))  # [C, K]
    y = jnp.array([0, 3, 3, 0])
    other = jnp.array([3, 0, 3, 0])
    fn = self.variant(lambda w: again_lib.ase_weights(w, y, other, alpha=0.6))
    rows = np.asarray(kernel).T
    assert_close(fn(kernel), 0.6 * rows[np.asarray(y)] + 0.4 * rows[np.asarray(other)])
    grad = self.variant(
      jax.grad(lambda w: jnp.sum(again_lib.ase_weights(w, y, other, alpha=0.6) ** 2))
    )(kernel)
    chex.assert_tree_all_finite(grad)
    # Column k of the gradient collects the rows that selected class k: classes 1, 2 none.
    chex.assert_trees_all_equal(grad[:, 1:3], jnp.zeros((6, 2)))
    jaxpr = jax.make_jaxpr(jax.grad(lambda w: jnp.sum(again_lib.ase_weights(w, y, other))))(kernel)
    assert _nan_prone_gathers_and_scatters(jaxpr.jaxpr, []) == []


class PickAndRowsTest(parameterized.TestCase):
  """``losses.pick`` / ``losses.rows`` equal indexing exactly (one term times 1, the rest
  times 0) and their gradients put the cotangent on the picked entries only."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_equal_indexing_and_gradients_at_the_boundary_indices(self):
    values = jax.random.normal(jax.random.key(0), (4, 6))
    index = jnp.array([0, 5, 5, 2])
    chex.assert_trees_all_equal(
      self.variant(losses.pick)(values, index), values[jnp.arange(4), index]
    )
    table = jax.random.normal(jax.random.key(1), (6, 3))
    chex.assert_trees_all_equal(self.variant(losses.rows)(table, index), table[index])
    grad = self.variant(jax.grad(lambda t: jnp.sum(losses.rows(t, index, 0.5))))(table)
    want = np.zeros((6, 3), np.float32)
    for k in np.asarray(index):
      want[k] += 0.5
    chex.assert_trees_all_equal(grad, jnp.asarray(want))
