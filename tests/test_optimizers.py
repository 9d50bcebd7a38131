"""The papers' per-epoch learning-rate schedules."""
import numpy as np

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
