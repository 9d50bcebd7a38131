"""Hinge (triplet) ranking losses: VSE0 (every negative), VSE++ (hardest negative), HVSA's difficulty weighting
and AMFMN's dynamic margin, on (B, D) image and text embeddings whose i-th image and caption are a pair.

For scores S = cos(images, texts), margins m_ij and negatives N_ij (id_i != id_j: captions of the same image
are never negatives of each other), the two directions' violations are

  cost_caption[i, j] = [m_ij + S_ij - S_ii]_+ N_ij  (image i the anchor, caption j a negative),
  cost_image[i, j]   = [m_ij + S_ij - S_jj]_+ N_ij  (caption j the anchor, image i a negative),

and a loss sums them over all negatives ('sum', vsepp/AMFMN `max_violation=False`) or takes each anchor's hardest
('hardest', VSE++): sum_i max_j cost_caption[i, j] + sum_j max_i cost_image[i, j]. Both are summed over anchors,
not averaged, as in vsepp's and AMFMN's code.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from rsalign_jax.losses.collectives import Hardest, Sum, batch_ids, global_positions, over_batch, results
from rsalign_jax.similarity import paired_unit_cosine_similarity, unit_cosine_similarity, upcast
from rsalign_jax.mesh_axes import BATCH_AXES

NEGATIVES = ("sum", "hardest")


def pair_hinge_costs(scores, row_positives, col_positives, margins, negatives):
  """Both directions' violations of a block of scores, given its rows' and columns' positive scores."""
  cost_caption = jnp.where(negatives, jnp.maximum(0.0, margins + scores - row_positives[:, None]), 0.0)
  cost_image = jnp.where(negatives, jnp.maximum(0.0, margins + scores - col_positives[None, :]), 0.0)
  return cost_caption, cost_image


def hinge_costs(scores, margin, negatives=None):
  """Violations of a global (B_img, B_txt) score matrix whose diagonal holds the positives.

  negatives: boolean (B_img, B_txt) mask; None = every off-diagonal pair.
  """
  positives = jnp.diagonal(scores)
  if negatives is None:
    negatives = ~jnp.eye(scores.shape[0], scores.shape[1], dtype=bool)
  return pair_hinge_costs(scores, positives, positives, margin, negatives)


def difficulty_weighted_triplet(scores, *, margin=0.2, beta=0.5):
  """HVSA's adaptive-alignment loss (released code): every negative weighted by exp(-beta * violation).

  sum_{i != j} c exp(-beta c) over both directions, divided by B^2. The weight is deliberately NOT detached, as in
  the reference, so a pair's gradient is proportional to exp(-beta c)(1 - beta c).
  """
  scores = upcast(scores)
  cost_caption, cost_image = hinge_costs(scores, margin)
  weighted = _difficulty_weighted(cost_caption, beta) + _difficulty_weighted(cost_image, beta)
  return jnp.sum(weighted) / scores.shape[0] ** 2


def _difficulty_weighted(cost, beta):
  return cost * jnp.exp(-beta * cost)


def _unweighted(cost):
  return cost


def _reference(images, texts, ids, row_data, col_data, *, pair_margin, negatives, penalty):
  scores = unit_cosine_similarity(images, texts)
  margins = pair_margin(row_data, col_data, jnp.arange(scores.shape[1]))
  cost_caption, cost_image = hinge_costs(scores, margins, ids[:, None] != ids[None, :])
  cost_caption, cost_image = penalty(cost_caption), penalty(cost_image)
  if negatives == "hardest":
    return jnp.sum(jnp.max(cost_caption, axis=1)) + jnp.sum(jnp.max(cost_image, axis=0))
  return jnp.sum(cost_caption) + jnp.sum(cost_image)


def _per_device(pairwise_stats, images, texts, ids, row_data, col_data, *, pair_margin, negatives, penalty):
  """VSE++ as row maxima of cost_caption and column maxima of cost_image on one block."""
  positives = paired_unit_cosine_similarity(images, texts)
  rows = {"image": images, "id": ids, "positive": positives, "data": row_data}
  cols = {"text": texts, "id": ids, "positive": positives, "position": global_positions(ids.shape[0]),
          "data": col_data}

  def block(rows, cols):
    scores = unit_cosine_similarity(rows["image"], cols["text"])
    margins = pair_margin(rows["data"], cols["data"], cols["position"])
    costs = pair_hinge_costs(scores, rows["positive"], cols["positive"], margins,
                             rows["id"][:, None] != cols["id"][None, :])
    cost_caption, cost_image = map(penalty, costs)
    if negatives == "hardest":
      return Hardest.over(cost_caption, 1), Hardest.over(cost_image, 0)
    return Sum(jnp.sum(cost_caption, 1) + jnp.sum(cost_image, 1)), ()

  local = sum(jnp.sum(x) for x in jax.tree.leaves(results(pairwise_stats(block, rows, cols))))
  return lax.psum(local, BATCH_AXES)


def hinge_triplet_loss(images, texts, ids=None, *, pair_margin, row_data=None, col_data=None, negatives="sum",
                       penalty=_unweighted, impl="global", mesh=None, block_size=None):
  """The bidirectional hinge loss (module docstring) with margins m = pair_margin(row_data, col_data, columns).

  row_data / col_data: per-example arrays (B, ...) that the margins of a block of rows x columns depend on (its
  rows' and its columns' entries; None when unused); `columns` are the block's column positions in the batch.
  penalty: applied to each violation before the sum/max (HVSA's difficulty weighting). impl as in
  `contrastive.softmax_loss`.
  """
  if negatives not in NEGATIVES:
    raise ValueError(f"negatives {negatives!r}: expected one of {NEGATIVES}")
  batch = (images, texts, batch_ids(ids, images.shape[0]), row_data, col_data)
  kwargs = dict(pair_margin=pair_margin, negatives=negatives, penalty=penalty)
  return over_batch(functools.partial(_reference, **kwargs), functools.partial(_per_device, **kwargs), batch,
                    impl=impl, mesh=mesh, block_size=block_size)


def _constant(margin):
  return lambda row_data, col_data, columns: margin


def vse_loss(images, texts, ids=None, *, margin=0.2, negatives="sum", impl="global", mesh=None, block_size=None):
  """VSE0 (negatives='sum') or VSE++ (negatives='hardest') with a fixed margin; same-id pairs are not negatives."""
  return hinge_triplet_loss(images, texts, ids, pair_margin=_constant(margin), negatives=negatives, impl=impl,
                            mesh=mesh, block_size=block_size)


def difficulty_weighted_loss(images, texts, ids=None, *, margin=0.2, beta=0.5, impl="global", mesh=None,
                             block_size=None):
  """`difficulty_weighted_triplet` of cos(images, texts) (ids=None: all distinct, as HVSA), any impl."""
  total = hinge_triplet_loss(images, texts, ids, pair_margin=_constant(margin),
                             penalty=functools.partial(_difficulty_weighted, beta=beta), impl=impl, mesh=mesh,
                             block_size=block_size)
  return total / images.shape[0] ** 2


def dynamic_margin(prior, *, gamma=0.6, beta=5.0):
  """AMFMN's alpha_ct(P) = gamma (e^beta - e^(beta P)) / (e^beta - 1): gamma for unrelated (P=0), 0 for P=1."""
  prior = upcast(prior)
  return gamma * (jnp.exp(beta) - jnp.exp(beta * prior)) / jnp.expm1(beta)


def dynamic_margin_loss(images, texts, prior, ids=None, *, gamma=0.6, beta=5.0, negatives="sum", impl="global",
                        mesh=None, block_size=None):
  """AMFMN's L_ct (docs/METHODS.md §3.4): the hinge loss with margin alpha_ct(P_ij) for both directions of pair (i, j).

  prior: (B, B) prior similarity P_ij of image i's captions to caption j (e.g. AMFMN's BLEU + word-overlap
  matrix looked up for the batch), sharded by rows like the embeddings. Paper defaults gamma 0.6, beta 5.
  """
  def pair_margin(prior_rows, col_data, columns):
    return dynamic_margin(jnp.take(prior_rows, columns, axis=1), gamma=gamma, beta=beta)

  return hinge_triplet_loss(images, texts, ids, pair_margin=pair_margin, row_data=prior, negatives=negatives,
                            impl=impl, mesh=mesh, block_size=block_size)
