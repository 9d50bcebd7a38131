"""CCNet's cross-modality distinction loss L_CD, as this project interprets it (METHODS Part B 2.2.4).

The abstract only says the loss learns cross-modal consistency by compacting intra-class samples; OUR design:

  L_CD = L_itc + class_weight * L_cls.

* L_itc: symmetric multi-positive InfoNCE over the model's (B, B) pair score matrix S (CCNet's scores are
  pairwise, so this works on S itself, not on embeddings): logits exp(log_scale) S, positives every pair of the
  same image_id (PIR's eq(idx, idx^T) / row-sum targets), learnable temperature initialised to 0.07 with the
  logit scale clipped at `max_scale` (CLIP's 100).
* L_cls: PIR-style class affiliation on the global embeddings v_g, t_g: each image is classified by softmax over its
  scaled cosines to the in-batch text class centres, each text against the image centres (`labels.class_centres`),
  sharing L_itc's scale. Rows with scene -1 (images whose dataset gives no class, e.g. RSICD's numeric names) are
  left out of both the centres and the average; a batch without labelled rows contributes 0.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from rsalign_jax.losses.labels import class_affiliation_loss
from rsalign_jax.losses.similarity import upcast

def score_matrix_infonce(scores, ids, *, log_scale):
  """1/2 [mean_i (lse_j L_ij - mean_{j: id_j = id_i} L_ij) + the same over columns], L = exp(log_scale) S.

  scores: (B, B) image-row x caption-column similarities of the batch's pairs; ids: (B,) image ids.
  """
  logits = jnp.exp(upcast(log_scale)) * upcast(scores)
  positives = ids[:, None] == ids[None, :]
  positive_logits = jnp.where(positives, logits, 0.0)
  num_positives = jnp.sum(positives, axis=1)  # symmetric: also the count per column
  image_to_text = jax.nn.logsumexp(logits, axis=1) - jnp.sum(positive_logits, axis=1) / num_positives
  text_to_image = jax.nn.logsumexp(logits, axis=0) - jnp.sum(positive_logits, axis=0) / num_positives
  return 0.5 * (jnp.mean(image_to_text) + jnp.mean(text_to_image))


class Objective(nn.Module):
  """L_CD on the model's outputs `scores` (B, B), `image_embedding`, `text_embedding` (B, d) and batch `scene`."""
  num_classes: int = 0
  class_weight: float = 1.0
  temperature: float = 0.07
  max_scale: float = 100.0

  @nn.compact
  def __call__(self, outputs, batch):
    log_scale = self.param("log_scale", lambda _: jnp.log(jnp.float32(1.0 / self.temperature)))
    log_scale = jnp.minimum(log_scale, jnp.log(self.max_scale))
    itc = score_matrix_infonce(outputs["scores"], batch["image_id"], log_scale=log_scale)
    metrics = {"itc": itc, "temperature": jnp.exp(-log_scale)}
    if not self.class_weight:
      return itc, metrics
    if "scene" not in batch:
      raise ValueError("loss.class_weight > 0 needs the scene labels: set config.input.fields = ('scene',), or "
                       "loss.class_weight = 0 for a dataset without them (Sydney-Captions)")
    if self.num_classes < 1:
      raise ValueError(f"loss.num_classes={self.num_classes}: expected the dataset's number of scene classes")
    labels = batch["scene"]
    cls = class_affiliation_loss(outputs["image_embedding"], outputs["text_embedding"], labels,
                                        num_classes=self.num_classes, log_scale=log_scale)
    metrics.update(cls=cls, labelled_fraction=jnp.mean(labels >= 0))
    return itc + self.class_weight * cls, metrics
