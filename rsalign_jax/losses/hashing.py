"""Hashing losses for CCLS2T (docs/METHODS.md Part B §4.2.4, an interpretation): relaxed codes h = tanh(W z) in
(-1, 1)^K are trained to be binary (quantisation), balanced (each bit +1 on half the data) and similarity-preserving
across modalities (DCMH's pairwise likelihood); retrieval then ranks by Hamming distance of sign(h)."""
import jax
import jax.numpy as jnp
from jax import lax

from rsalign_jax.losses.collectives import Sum, batch_ids, over_batch, results
from rsalign_jax.similarity import pairwise_dot, upcast
from rsalign_jax.mesh_axes import BATCH_AXES


def binary_codes(codes):
  """sign(h) in {-1, +1}^K (0 maps to +1, so every bit is set)."""
  return jnp.where(codes >= 0, 1.0, -1.0).astype(codes.dtype)


def quantization_loss(codes):
  """mean_i ||h_i - sign(h_i)||^2 of (B, K) codes (the sign is a constant: gradient 2 (h - sign h))."""
  codes = upcast(codes)
  return jnp.mean(jnp.sum((codes - binary_codes(codes)) ** 2, axis=-1))


def bit_balance_loss(codes):
  """||mean_i h_i||^2 of (B, K) codes: zero when every bit averages to 0 over the batch."""
  return jnp.sum(jnp.mean(upcast(codes), axis=0) ** 2)


def _pair_log_likelihood(image_codes, text_codes, row_ids, col_ids):
  theta = 0.5 * pairwise_dot(upcast(image_codes), upcast(text_codes))
  return jax.nn.log_sigmoid(jnp.where(row_ids[:, None] == col_ids[None, :], theta, -theta))


def _reference(image_codes, text_codes, ids):
  return -jnp.mean(_pair_log_likelihood(image_codes, text_codes, ids, ids))


def _per_device(pairwise_stats, image_codes, text_codes, ids):
  def block(rows, cols):
    return Sum(jnp.sum(_pair_log_likelihood(rows["image"], cols["text"], rows["id"], cols["id"]), axis=1)), ()

  image_stats, _ = pairwise_stats(block, {"image": image_codes, "id": ids}, {"text": text_codes, "id": ids})
  return -lax.psum(jnp.sum(results(image_stats)), BATCH_AXES) / (image_codes.shape[0] * lax.axis_size(BATCH_AXES)) ** 2


def pairwise_likelihood_loss(image_codes, text_codes, ids=None, *, impl="global", mesh=None, block_size=None):
  """DCMH's negative log-likelihood of the pair similarities s_ij = [id_i = id_j] given theta_ij = <h_i, g_j> / 2:

  1/B^2 sum_ij softplus(theta_ij) - s_ij theta_ij  (= -log sigmoid(+-theta_ij)). impl as in
  `contrastive.softmax_loss`.
  """
  return over_batch(_reference, _per_device, (image_codes, text_codes, batch_ids(ids, image_codes.shape[0])),
                    impl=impl, mesh=mesh, block_size=block_size)
