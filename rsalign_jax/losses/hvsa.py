"""HVSA's objective: difficulty-weighted triplet + feature uniformity, mixed by a learned weighting MLP.

As in the released code (docs/METHODS.md §2.5): uniformity on image embeddings only, on rows 0, s, 2s, ... of the batch
(s = `uniformity_stride`, 5 in the reference; with caption-shuffled batches that is a random 1/s subsample);
the two losses are weighted by softmax(MLP(losses)), an MLP trained by the same optimizer, not detached.
`impl`/`block_size` select how the triplet term is computed over the global batch (see `rsalign_jax.losses`);
the uniformity term works on a 1/stride subsample and is always computed globally.
"""
import flax.linen as nn
import jax.numpy as jnp

from rsalign_jax.losses import base
from rsalign_jax.losses.triplet import difficulty_weighted_loss
from rsalign_jax.losses.uniformity import feature_uniformity

# PyTorch's default Linear init, U(+-1/sqrt(fan_in)), as in the reference.
_torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class AutoWeighting(nn.Module):
  """w = softmax(W3 PReLU(W2 PReLU(W1 l))) for a vector of losses l (HVSA's `AutoWeightedModule`)."""

  @nn.compact
  def __call__(self, losses):
    h = losses
    for width in (64, 128):
      h = nn.Dense(width, use_bias=False, kernel_init=_torch_linear_init)(h)
      h = nn.PReLU(negative_slope_init=0.25)(h)
    return nn.softmax(nn.Dense(losses.shape[-1], use_bias=False, kernel_init=_torch_linear_init)(h))


class Objective(base.Objective):
  margin: float = 0.2
  beta: float = 0.5
  gamma: float = 2.0
  uniformity: str = "exp_mean"
  uniformity_stride: int = 5
  auto_weighting: bool = True
  impl: str = "global"
  block_size: int = 0

  @nn.compact
  def __call__(self, outputs, batch):
    del batch
    images, texts = outputs["image_embedding"], outputs["text_embedding"]
    align = difficulty_weighted_loss(images, texts, margin=self.margin, beta=self.beta, impl=self.impl,
                                     block_size=self.block_size or None)
    unif = feature_uniformity(images[::self.uniformity_stride], gamma=self.gamma, form=self.uniformity)
    losses = jnp.stack([align, unif])
    weights = AutoWeighting()(losses) if self.auto_weighting else jnp.ones_like(losses)
    total = jnp.dot(weights, losses)
    return total, {"align": align, "uniformity": unif, "weight_align": weights[0], "weight_uniformity": weights[1]}
