"""Feature uniformity on the unit hypersphere (Wang & Isola 2020), and HVSA's no-log variant."""
import functools

import jax.numpy as jnp
from jax import lax

from rsalign_jax.losses.collectives import Sum, batch_ids, over_batch, results
from rsalign_jax.similarity import l2_normalize, pairwise_dot, upcast
from rsalign_jax.mesh_axes import BATCH_AXES

UNIFORMITY_FORMS = ("exp_mean", "log")


def _gaussian_kernel(a, b, gamma):
  """exp(-gamma ||a^_p - b^_q||^2) of the L2-normalised rows, the squared distance expanded exactly
  (|a|^2 + |b|^2 - 2ab, not 2 - 2ab), so gradients match ||a-b||^2 for any input."""
  a, b = l2_normalize(upcast(a)), l2_normalize(upcast(b))
  sq_dist = jnp.sum(a * a, axis=-1)[:, None] + jnp.sum(b * b, axis=-1)[None, :] - 2.0 * pairwise_dot(a, b)
  return jnp.exp(-gamma * jnp.maximum(sq_dist, 0.0))


def _finish(kernel_sum, num_pairs, form):
  mean = kernel_sum / num_pairs
  return jnp.log(mean) if form == "log" else mean


def _reference(x, ids, *, gamma, form):
  distinct = ids[:, None] != ids[None, :]
  kernel = jnp.where(distinct, _gaussian_kernel(x, x, gamma), 0.0)
  return _finish(jnp.sum(kernel), jnp.sum(distinct), form)


def _per_device(pairwise_stats, x, ids, *, gamma, form):
  def block(rows, cols):
    distinct = rows["id"][:, None] != cols["id"][None, :]
    kernel = jnp.where(distinct, _gaussian_kernel(rows["x"], cols["x"], gamma), 0.0)
    return (Sum(jnp.sum(kernel, axis=1)), Sum(jnp.sum(distinct, axis=1, dtype=kernel.dtype))), ()

  local = {"x": x, "id": ids}
  (kernel_sum, num_pairs), _ = results(pairwise_stats(block, local, local))
  return _finish(lax.psum(jnp.sum(kernel_sum), BATCH_AXES), lax.psum(jnp.sum(num_pairs), BATCH_AXES), form)


def feature_uniformity(x, ids=None, *, gamma=2.0, form="exp_mean", impl="global", mesh=None, block_size=None):
  """Mean over pairs p != q (of different ids, when given) of exp(-gamma ||x^_p - x^_q||^2), x^ = x / ||x||.

  `exp_mean` is HVSA's released `feature_unif_loss` (no log); `log` is Wang & Isola's L_uniform (log of the mean).
  ids: (N,) ints; pairs of equal ids (e.g. the same image twice) are left out. impl as in
  `contrastive.softmax_loss`: the sharded variants psum the kernel sum and the pair count over devices.
  """
  if form not in UNIFORMITY_FORMS:
    raise ValueError(f"uniformity form {form!r}: expected one of {UNIFORMITY_FORMS}")
  n = x.shape[0]
  if n < 2:
    raise ValueError(f"feature uniformity needs at least 2 rows, got {n}")
  kwargs = dict(gamma=gamma, form=form)
  return over_batch(functools.partial(_reference, **kwargs), functools.partial(_per_device, **kwargs),
                    (x, batch_ids(ids, n)), impl=impl, mesh=mesh, block_size=block_size)
