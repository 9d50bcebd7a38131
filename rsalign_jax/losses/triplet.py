"""Hinge (triplet) ranking losses on a global (B_img, B_txt) similarity matrix whose diagonal holds the positives."""
import jax.numpy as jnp

from rsalign_jax.losses.similarity import upcast


def hinge_costs(scores, margin):
  """Both directions' hinge violations with the positives on the diagonal set to 0.

  cost_caption[i, j] = [margin + S_ij - S_ii]_+ : image i is the anchor, caption j a negative;
  cost_image[i, j]   = [margin + S_ij - S_jj]_+ : caption j is the anchor, image i a negative.
  """
  positives = jnp.diagonal(scores)
  off_diagonal = ~jnp.eye(scores.shape[0], scores.shape[1], dtype=bool)
  cost_caption = jnp.where(off_diagonal, jnp.maximum(0.0, margin + scores - positives[:, None]), 0.0)
  cost_image = jnp.where(off_diagonal, jnp.maximum(0.0, margin + scores - positives[None, :]), 0.0)
  return cost_caption, cost_image


def difficulty_weighted_triplet(scores, *, margin=0.2, beta=0.5):
  """HVSA's adaptive-alignment loss (released code): every negative weighted by exp(-beta * violation).

  sum_{i != j} c exp(-beta c) over both directions, divided by B^2. The weight is deliberately NOT detached, as in
  the reference, so a pair's gradient is proportional to exp(-beta c)(1 - beta c).
  """
  scores = upcast(scores)
  cost_caption, cost_image = hinge_costs(scores, margin)
  weighted = cost_caption * jnp.exp(-beta * cost_caption) + cost_image * jnp.exp(-beta * cost_image)
  return jnp.sum(weighted) / scores.shape[0] ** 2
