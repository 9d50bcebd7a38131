"""CCNet's cross-modality distinction loss L_CD, as this project interprets it (docs/METHODS.md Part B §2.2.4).

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
import jax.numpy as jnp

from rsalign_jax.losses import base
from rsalign_jax.losses import contrastive
from rsalign_jax.losses.labels import class_affiliation_loss
from rsalign_jax.similarity import upcast


class Objective(base.Objective):
  """L_CD on the model's outputs `scores` (B, B), `image_embedding`, `text_embedding` (B, d) and batch `scene`."""
  num_classes: int = 0
  class_weight: float = 1.0
  temperature: float = 0.07
  max_scale: float = 100.0

  @property
  def batch_fields(self):
    return ("scene",) if self.class_weight else ()

  @nn.compact
  def __call__(self, outputs, batch):
    log_scale = self.param("log_scale", lambda _: jnp.log(jnp.float32(1.0 / self.temperature)))
    log_scale = jnp.minimum(log_scale, jnp.log(self.max_scale))
    itc = contrastive.logits_loss(jnp.exp(log_scale) * upcast(outputs["scores"]), batch["image_id"])
    metrics = {"itc": itc, "temperature": jnp.exp(-log_scale)}
    if not self.class_weight:
      return itc, metrics
    if self.num_classes < 1:
      raise ValueError(f"loss.num_classes={self.num_classes}: expected the dataset's number of scene classes")
    labels = batch["scene"]
    cls = class_affiliation_loss(outputs["image_embedding"], outputs["text_embedding"], labels,
                                        num_classes=self.num_classes, log_scale=log_scale)
    metrics.update(cls=cls, labelled_fraction=jnp.mean(labels >= 0))
    return itc + self.class_weight * cls, metrics
