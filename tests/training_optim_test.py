"""The optimizer: coupled weight decay, gradient clipping, freezing (hand-computed updates)."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl.testing import parameterized

from agad.training import loop, optim

LR, WD = 0.1, 0.01


def _cfg(**kw):
  c = ml_collections.ConfigDict(
    dict(
      name="sgd",
      lr=LR,
      momentum=0.0,
      nesterov=False,
      weight_decay=WD,
      schedule="constant",
      warmup_epochs=0.0,
      boundaries=(),
      decay_factor=0.1,
      grad_clip=0.0,
    )
  )
  c.update(kw)
  return c


PARAMS = {"a": {"w": jnp.array([1.0, -2.0])}, "b": {"w": jnp.array([[0.5]])}}
GRADS = {"a": {"w": jnp.array([3.0, 0.0])}, "b": {"w": jnp.array([[4.0]])}}  # global norm 5


class ClipTest(chex.TestCase, parameterized.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((0.0, 1.0), (10.0, 1.0), (5.0, 1.0), (2.5, 0.5), (1.0, 0.2))
  def test_update_is_minus_lr_times_scaled_gradient_plus_decay(self, clip, scale):
    tx, _ = optim.make_optimizer(_cfg(grad_clip=clip), steps_per_epoch=10, num_epochs=1)
    update = self.variant(lambda g, s, p: tx.update(g, s, p)[0])
    got = update(GRADS, tx.init(PARAMS), PARAMS)
    # Clip first (norm 5 -> clip when 5 > clip), then PyTorch-style decay g + wd w, then -lr.
    want = jax.tree.map(lambda g, p: -LR * (scale * g + WD * p), GRADS, PARAMS)
    chex.assert_trees_all_close(got, want, rtol=1e-6)

  def test_frozen_leaves_are_outside_the_norm_and_get_no_update(self):
    tx, _ = optim.make_optimizer(
      _cfg(grad_clip=1.5, weight_decay=0.0),
      steps_per_epoch=10,
      num_epochs=1,
      frozen=[r"^b/"],
      params=PARAMS,
    )
    got = tx.update(GRADS, tx.init(PARAMS), PARAMS)[0]
    # Trainable gradient [3, 0] has norm 3 (not 5): scaled by 1.5 / 3.
    chex.assert_trees_all_close(got["a"]["w"], -LR * 0.5 * GRADS["a"]["w"], rtol=1e-6)
    chex.assert_trees_all_equal(got["b"]["w"], jnp.zeros((1, 1)))

  def test_negative_clip_is_refused_by_name(self):
    with pytest.raises(ValueError, match=r"optim.grad_clip=-1.0 must be >= 0"):
      optim.make_optimizer(_cfg(grad_clip=-1.0), steps_per_epoch=10, num_epochs=1)

  def test_clipped_sgd_survives_a_gradient_that_overflows_plain_sgd(self):
    # f(w) = 10 w^4: plain SGD from w = 3 at lr 0.1 explodes; clipped to norm 1 it converges.
    grad = jax.grad(lambda w: 10.0 * jnp.sum(w**4))
    finals = {}
    for clip in (0.0, 1.0):
      tx, _ = optim.make_optimizer(_cfg(grad_clip=clip, weight_decay=0.0), 10, 1)
      w = jnp.array([3.0])
      state = tx.init(w)
      for _ in range(60):
        u, state = tx.update(grad(w), state, w)
        w = w + u
      finals[clip] = float(w[0])
    assert not np.isfinite(finals[0.0]) or abs(finals[0.0]) > 1e6
    assert abs(finals[1.0]) < 0.3


def test_runs_saved_before_grad_clip_existed_resume_under_its_off_value():
  old = {"seed": 0, "optim": {"lr": 0.1}}
  assert loop.trajectory_diff(old, {"seed": 0, "optim": {"lr": 0.1, "grad_clip": 0.0}}) == []
  assert loop.trajectory_diff(old, {"seed": 0, "optim": {"lr": 0.1, "grad_clip": 1.0}}) == [
    "optim.grad_clip: 0.0 -> 1.0"
  ]
