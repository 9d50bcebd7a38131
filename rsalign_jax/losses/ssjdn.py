"""SSJDN's objective (our design, docs/METHODS.md Part B §3.2.7; the paper's formulas are not public):
STL + class_weight * (CE_img + CE_txt).

- STL, the semantic-guided triplet loss: bidirectional VSE++ (hardest negative, summed over anchors) whose margin
  for a negative is `margin` when its scene class differs from the anchor's and `margin * same_label_factor` (< 1)
  when it is the same, i.e. `labels.semantic_guided_triplet_loss`. Ours on top of docs/METHODS.md: captions of the same
  image (same `image_id`) are never negatives, and a row without a scene class (scene -1, e.g. RSICD's numbered
  images) counts as "another class" for every other row, so it always gets the full margin.
- CE: softmax cross-entropy of the model's image and text class logits (its label-prototype attention) against the
  scene label, each averaged over the rows that have a class; rows with scene -1 are left out (0 when none has one).
`impl`/`block_size` select how STL is computed over the global batch (see `rsalign_jax.losses`); the CE terms are
per row and XLA partitions them under jit.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from rsalign_jax.losses import base
from rsalign_jax.losses.labels import semantic_guided_triplet_loss
from rsalign_jax.similarity import upcast


def stl_labels(scene):
  """Scene classes for STL, with each unlabelled (-1) row given its own label -1 - row, equal to no other row's."""
  return jnp.where(scene >= 0, scene, -1 - jnp.arange(scene.shape[0], dtype=scene.dtype))


def labelled_cross_entropy(logits, scene):
  """(mean CE over rows with scene >= 0, accuracy over those rows); both 0 when no row has a class."""
  logits = upcast(logits)
  labelled = scene >= 0
  target = jnp.where(labelled, scene, 0)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), target[:, None], axis=-1)[:, 0]
  correct = jnp.argmax(logits, axis=-1) == target
  count = jnp.maximum(jnp.sum(labelled), 1)
  return jnp.sum(jnp.where(labelled, nll, 0.0)) / count, jnp.sum(labelled & correct) / count


class Objective(base.Objective):
  margin: float = 0.2
  same_label_factor: float = 0.5
  class_weight: float = 1.0
  negatives: str = "hardest"
  impl: str = "global"
  block_size: int = 0

  @property
  def batch_fields(self):
    return ("scene",)

  @nn.compact
  def __call__(self, outputs, batch):
    scene = batch["scene"]
    stl = semantic_guided_triplet_loss(outputs["image_embedding"], outputs["text_embedding"], stl_labels(scene),
                                       batch["image_id"], margin=self.margin,
                                       same_label_factor=self.same_label_factor, negatives=self.negatives,
                                       impl=self.impl, block_size=self.block_size or None)
    ce_image, accuracy_image = labelled_cross_entropy(outputs["image_logits"], scene)
    ce_text, accuracy_text = labelled_cross_entropy(outputs["text_logits"], scene)
    total = stl + self.class_weight * (ce_image + ce_text)
    return total, {"stl": stl, "ce_image": ce_image, "ce_text": ce_text, "class_accuracy_image": accuracy_image,
                   "class_accuracy_text": accuracy_text}
