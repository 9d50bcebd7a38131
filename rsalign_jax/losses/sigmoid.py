"""SigLIP's pairwise sigmoid loss, with every same-id pair of the batch a positive.

loss = -1/B sum_{i,j} log sigmoid(z_ij (exp(log_scale) cos(x_i, y_j) + bias)), z_ij = +1 if id_i = id_j else -1
(big_vision's `siglip.py` with log_scale = its `t` and bias its `b`; SigLIP initialises them to log 10 and -10).
"""
import jax
import jax.numpy as jnp
from jax import lax

from rsalign_jax.losses.collectives import Sum, batch_ids, over_batch, results
from rsalign_jax.similarity import unit_cosine_similarity, upcast
from rsalign_jax.mesh_axes import BATCH_AXES


def _pair_log_likelihood(images, texts, row_ids, col_ids, log_scale, bias):
  logits = jnp.exp(log_scale) * unit_cosine_similarity(images, texts) + bias
  return jax.nn.log_sigmoid(jnp.where(row_ids[:, None] == col_ids[None, :], logits, -logits))


def _reference(images, texts, ids, log_scale, bias):
  return -jnp.sum(_pair_log_likelihood(images, texts, ids, ids, log_scale, bias)) / images.shape[0]


def _per_device(pairwise_stats, images, texts, ids, log_scale, bias):
  def block(rows, cols):
    pairs = _pair_log_likelihood(rows["image"], cols["text"], rows["id"], cols["id"], log_scale, bias)
    return Sum(jnp.sum(pairs, axis=1)), ()

  image_stats, _ = pairwise_stats(block, {"image": images, "id": ids}, {"text": texts, "id": ids})
  return -lax.psum(jnp.sum(results(image_stats)), BATCH_AXES) / (images.shape[0] * lax.axis_size(BATCH_AXES))


def sigmoid_loss(images, texts, ids=None, *, log_scale, bias, impl="global", mesh=None, block_size=None):
  """SigLIP loss of (B, D) image and text embeddings; ids and impl as in `contrastive.softmax_loss`."""
  batch = (images, texts, batch_ids(ids, images.shape[0]))
  return over_batch(_reference, _per_device, batch, (upcast(log_scale), upcast(bias)), impl=impl, mesh=mesh,
                    block_size=block_size)
