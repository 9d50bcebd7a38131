"""Losses for class-supervised methods (docs/METHODS.md Part B; both are the project's interpretations of the papers).

* SSJDN's semantic-guided triplet loss (3.2.7): VSE++ whose margin for a negative depends on label agreement, m0
  for another scene class and m0 * same_label_factor (< 1) for the anchor's class, so same-semantics pairs are
  pushed apart less.
* CCNet's cross-modality distinction loss (2.2.4): L_CD = L_itc + class_weight L_cls, with L_itc the
  multi-positive CLIP loss and L_cls PIR-style "affiliation": every image is classified by softmax over its
  cosines to the in-batch text class centres (mean normalised text embedding of each class present in the batch),
  every text against the image centres, which compacts each class across modalities and separates classes.
"""
import jax
import jax.numpy as jnp

from rsalign_jax.losses import contrastive, triplet
from rsalign_jax.similarity import l2_normalize, unit_cosine_similarity, upcast


def semantic_guided_triplet_loss(images, texts, labels, ids=None, *, margin=0.2, same_label_factor=0.5,
                                 negatives="hardest", impl="global", mesh=None, block_size=None):
  """The bidirectional hinge loss of `triplet` with m_ij = margin * (same_label_factor if y_i = y_j else 1).

  labels: (B,) scene class of each pair. Same-id pairs are still never negatives.
  """
  def pair_margin(row_labels, col_labels, columns):
    return jnp.where(row_labels[:, None] == col_labels[None, :], margin * same_label_factor, margin)

  return triplet.hinge_triplet_loss(images, texts, ids, pair_margin=pair_margin, row_data=labels, col_data=labels,
                                    negatives=negatives, impl=impl, mesh=mesh, block_size=block_size)


def class_centres(x, labels, num_classes):
  """(num_classes, D) mean of the L2-normalised rows of each class, and which classes occur in the batch."""
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=x.dtype)
  counts = jnp.sum(one_hot, axis=0)
  return (one_hot.T @ l2_normalize(x)) / jnp.maximum(counts, 1.0)[:, None], counts > 0


_ABSENT = -1e9  # logit of a class absent from the batch: exp() underflows to 0, and stays finite with no class


def _affiliation(x, labels, centres, present, scale):
  """Mean over labelled rows (label >= 0) of the cross-entropy of softmax_k(scale cos(x, centre_k)) at the label."""
  logits = jnp.where(present[None, :], scale * unit_cosine_similarity(x, centres), _ABSENT)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  labelled = labels >= 0
  target = jnp.take_along_axis(log_probs, jnp.where(labelled, labels, 0)[:, None], axis=-1)[:, 0]
  return -jnp.sum(jnp.where(labelled, target, 0.0)) / jnp.maximum(jnp.sum(labelled), 1)


def class_affiliation_loss(images, texts, labels, *, num_classes, log_scale):
  """1/2 [CE(softmax_k(s cos(v_i, c^txt_k)), y_i) + CE(softmax_k(s cos(t_i, c^img_k)), y_i)], averaged over the
  labelled rows, s = exp(log_scale), classes absent from the batch left out. Label -1 (no class, e.g. RSICD's
  numerically named images) is left out of the centres and of the average. The centres are not detached.

  Not pairwise over the batch (B x num_classes), so it has no sharded variant: XLA partitions it under jit.
  """
  images, texts, scale = upcast(images), upcast(texts), jnp.exp(upcast(log_scale))
  image_centres, present = class_centres(images, labels, num_classes)  # one_hot(-1) is all zero
  text_centres, _ = class_centres(texts, labels, num_classes)
  return 0.5 * (_affiliation(images, labels, text_centres, present, scale)
                + _affiliation(texts, labels, image_centres, present, scale))


def distinction_loss(images, texts, labels, ids=None, *, num_classes, log_scale, class_weight=1.0, impl="global",
                     mesh=None, block_size=None):
  """CCNet's L_CD = softmax_loss(ids) + class_weight * class_affiliation_loss; impl applies to the pairwise part."""
  itc = contrastive.softmax_loss(images, texts, ids, log_scale=log_scale, impl=impl, mesh=mesh,
                                 block_size=block_size)
  return itc + class_weight * class_affiliation_loss(images, texts, labels, num_classes=num_classes,
                                                     log_scale=log_scale)
