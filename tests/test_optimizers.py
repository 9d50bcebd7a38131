"""The papers' per-epoch learning-rate schedules, per-parameter lr factors and frozen parameters' gradients."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from rsalign_jax import optimizers


def reference_hvsa_lr(epoch, base):
  """HVSA's `adjust_learning_rate`, applied at the start of each epoch to the optimizer's current lr."""
  lr = base
  for e in range(epoch + 1):
    if e < 10:
      lr = base * (e + 1) / 10
    if e % 20 == 19:
      lr = lr * 0.1
  return lr


def test_hvsa_schedule_matches_the_reference_loop():
  schedule = optimizers.warmup_step_decay(5e-4, steps_per_epoch=3, warmup_epochs=10, decay_every_epochs=20,
                                          decay_factor=0.1)
  for epoch in range(50):
    for step in range(epoch * 3, epoch * 3 + 3):
      np.testing.assert_allclose(float(schedule(step)), reference_hvsa_lr(epoch, 5e-4), rtol=1e-6)


def test_amfmn_schedule_decays_by_0_7_without_warmup():
  schedule = optimizers.warmup_step_decay(1e-4, steps_per_epoch=1, warmup_epochs=0, decay_every_epochs=20,
                                          decay_factor=0.7)
  np.testing.assert_allclose([float(schedule(e)) for e in (0, 18, 19, 38, 39, 69)],
                             [1e-4, 1e-4, 7e-5, 7e-5, 4.9e-5, 3.43e-5], rtol=1e-6)


def adam_config(**optimizer):
  return ml_collections.ConfigDict(dict(optimizer=dict(
      name="adam", lr=0.1, b1=0.9, b2=0.999, eps=1e-12, weight_decay=0.0, grad_clip_norm=0.0, **optimizer)))


def test_lr_mults_scale_the_schedule_per_parameter_first_match_wins():
  """Adam's first step moves every parameter by its lr (times the gradient's sign)."""
  config = adam_config(frozen=("model/trunk/.*",),
                       lr_mults=(("model/backbone/last/.*", 0.5), ("model/backbone/.*", 0.1)))
  leaf = {"w": jnp.ones(2)}
  params = {"model": {"trunk": leaf, "backbone": {"first": leaf, "last": leaf}, "head": leaf}, "objective": {}}
  schedule = lambda step: 0.2 * (step + 1)  # the factors scale a schedule, not only a constant
  tx = optimizers.make_optimizer(config, schedule)
  grads = jax.tree.map(lambda p: -3 * jnp.ones_like(p), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  moved = jax.tree.map(lambda u: float(u[0]), updates)["model"]
  np.testing.assert_allclose([moved["trunk"]["w"], moved["backbone"]["first"]["w"], moved["backbone"]["last"]["w"],
                              moved["head"]["w"]], [0.0, 0.02, 0.1, 0.2], rtol=1e-5)
  config.optimizer.lr_mults = (("model/neck/.*", 0.1),)
  with pytest.raises(ValueError, match=r"optimizer.lr_mults: \['model/neck/.\*'\] match no parameter"):
    optimizers.make_optimizer(config, 0.1).init(params)


def test_stop_frozen_gradients_zeroes_exactly_the_frozen_gradients():
  params = {"model": {"trunk": {"w": jnp.array([1.0, 2.0])}, "head": {"w": jnp.array([3.0, -1.0])}}}
  x = jnp.array([0.5, -2.0])

  def loss(p):
    hidden = jnp.tanh(p["model"]["trunk"]["w"] * x)
    return jnp.sum((p["model"]["head"]["w"] * hidden) ** 2)

  frozen = optimizers.frozen_mask(params, ("model/trunk/.*",))
  assert frozen == {"model": {"trunk": {"w": True}, "head": {"w": False}}}
  grads = jax.grad(lambda p: loss(optimizers.stop_frozen_gradients(p, frozen)))(params)
  hidden = np.tanh(np.array([1.0, 2.0]) * np.array([0.5, -2.0]))
  np.testing.assert_array_equal(grads["model"]["trunk"]["w"], 0.0)
  np.testing.assert_allclose(grads["model"]["head"]["w"], 2 * np.array([3.0, -1.0]) * hidden ** 2, rtol=1e-6)
  assert optax.tree.norm(grads) == pytest.approx(np.linalg.norm(2 * np.array([3.0, -1.0]) * hidden ** 2), rel=1e-6)
