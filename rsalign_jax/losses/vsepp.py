"""VSE++ (Faghri et al., BMVC 2018) as an objective: the fixed-margin hinge triplet loss over the global batch.

The baseline the RS retrieval papers compare against (docs/METHODS.md §4.1's first row) and an ablation row of the
real-data table: negatives='hardest' is VSE++, 'sum' is VSE0. Captions of the same image in a batch
(`batch['image_id']`) are never negatives. `impl`/`block_size` as in `rsalign_jax.losses`.
"""
import flax.linen as nn

from rsalign_jax.losses import base
from rsalign_jax.losses.triplet import NEGATIVES, vse_loss


class Objective(base.Objective):
  margin: float = 0.2
  negatives: str = "hardest"
  impl: str = "global"
  block_size: int = 0

  @nn.compact
  def __call__(self, outputs, batch):
    if self.negatives not in NEGATIVES:
      raise ValueError(f"loss.negatives={self.negatives!r}: expected one of {NEGATIVES}")
    loss = vse_loss(outputs["image_embedding"], outputs["text_embedding"], batch["image_id"], margin=self.margin,
                    negatives=self.negatives, impl=self.impl, block_size=self.block_size or None)
    return loss, {}
