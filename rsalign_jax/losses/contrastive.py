"""CLIP's symmetric softmax (InfoNCE) loss, with every same-id pair of the batch a positive.

L_ij = exp(log_scale) cos(x_i, y_j) (log_scale is open_clip's `logit_scale`, CLIP's 1/tau = exp(log_scale)), and
P_i = {j : id_j = id_i} the captions of image i's image in the batch (always including j = i). Then

  loss = 1/2 [ 1/B sum_i -1/|P_i| sum_{j in P_i} log softmax_j(L_i.)
             + 1/B sum_j -1/|P_j| sum_{i in P_j} log softmax_i(L_.j) ],

i.e. cross-entropy against targets uniform over the positives (PIR's eq(idx, idx^T) / row-sum), which is
logsumexp minus the mean positive logit. With distinct ids it is exactly CLIP's loss.
"""
import jax
import jax.numpy as jnp
from jax import lax

from rsalign_jax.losses.collectives import LogSumExp, Sum, batch_ids, over_batch, results
from rsalign_jax.similarity import unit_cosine_similarity, upcast
from rsalign_jax.mesh_axes import BATCH_AXES


def logits_loss(logits, ids):
  """The loss above of a (B, B) image-row x caption-column logits matrix of the batch's pairs; ids: (B,) image ids.
  For methods whose scores are not embedding cosines (CCNet's pairwise score)."""
  logits = upcast(logits)
  positives = ids[:, None] == ids[None, :]
  positive_logits = jnp.where(positives, logits, 0.0)
  num_positives = jnp.sum(positives, axis=1)  # ids are symmetric: also the count per column
  image_to_text = jax.nn.logsumexp(logits, axis=1) - jnp.sum(positive_logits, axis=1) / num_positives
  text_to_image = jax.nn.logsumexp(logits, axis=0) - jnp.sum(positive_logits, axis=0) / num_positives
  return 0.5 * (jnp.mean(image_to_text) + jnp.mean(text_to_image))


def _reference(images, texts, ids, log_scale):
  return logits_loss(jnp.exp(log_scale) * unit_cosine_similarity(images, texts), ids)


def _per_device(pairwise_stats, images, texts, ids, log_scale):
  """One logits block serves both directions: text->image is the column softmax of the image rows."""
  scale = jnp.exp(log_scale)

  def block(rows, cols):
    logits = scale * unit_cosine_similarity(rows["image"], cols["text"])
    positives = rows["id"][:, None] == cols["id"][None, :]
    positive_logits = jnp.where(positives, logits, 0.0)
    return tuple((LogSumExp.over(logits, axis), Sum(jnp.sum(positive_logits, axis)),
                  Sum(jnp.sum(positives, axis, dtype=logits.dtype))) for axis in (1, 0))

  image_stats, text_stats = pairwise_stats(block, {"image": images, "id": ids}, {"text": texts, "id": ids})

  def summed_loss(stats):
    logsumexp, positive_sum, num_positives = results(stats)
    return jnp.sum(logsumexp - positive_sum / num_positives)

  total = lax.psum(summed_loss(image_stats) + summed_loss(text_stats), BATCH_AXES)
  return total / (2 * images.shape[0] * lax.axis_size(BATCH_AXES))


def softmax_loss(images, texts, ids=None, *, log_scale, impl="global", mesh=None, block_size=None):
  """Multi-positive CLIP loss of (B, D) image and text embeddings (cosine, so unnormalised towers are fine).

  ids: (B,) ints, equal for captions of the same image (None: all distinct). impl: 'global' (reference, XLA
  partitions it), 'gather' or 'ring' (see `collectives`), over `mesh`'s batch axes.
  """
  batch = (images, texts, batch_ids(ids, images.shape[0]))
  return over_batch(_reference, _per_device, batch, (upcast(log_scale),), impl=impl, mesh=mesh,
                    block_size=block_size)
