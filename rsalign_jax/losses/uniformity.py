"""Feature uniformity on the unit hypersphere (Wang & Isola 2020), and HVSA's no-log variant."""
import jax.numpy as jnp

from rsalign_jax.losses.similarity import l2_normalize, upcast

UNIFORMITY_FORMS = ("exp_mean", "log")


def feature_uniformity(x, *, gamma=2.0, form="exp_mean"):
  """Mean over pairs p != q of exp(-gamma ||x^_p - x^_q||^2) of the L2-normalised rows x^.

  `exp_mean` is HVSA's released `feature_unif_loss` (no log); `log` is Wang & Isola's L_uniform (log of the mean).
  Squared distances are expanded exactly (|a|^2 + |b|^2 - 2ab), so gradients match ||a-b||^2 for any input.
  """
  if form not in UNIFORMITY_FORMS:
    raise ValueError(f"uniformity form {form!r}: expected one of {UNIFORMITY_FORMS}")
  x = l2_normalize(upcast(x))
  n = x.shape[0]
  if n < 2:
    raise ValueError(f"feature uniformity needs at least 2 rows, got {n}")
  sq_norms = jnp.sum(x * x, axis=-1)
  sq_dist = jnp.maximum(sq_norms[:, None] + sq_norms[None, :] - 2.0 * x @ x.T, 0.0)
  off_diagonal = ~jnp.eye(n, dtype=bool)
  mean = jnp.sum(jnp.where(off_diagonal, jnp.exp(-gamma * sq_dist), 0.0)) / (n * (n - 1))
  return jnp.log(mean) if form == "log" else mean
