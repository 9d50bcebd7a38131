"""AMFMN's objective: the bidirectional hinge on the model's (B, B) score matrix, fixed or dynamic margin.

Released code (docs/METHODS.md §3.4, `utils.calcul_loss`): L = sum_{i,j neg} [m + S_ij - S_ii]_+ + [m + S_ij - S_jj]_+
with m = 0.2, summed over every negative (VSE0; `max_violation=True` keeps each anchor's hardest, VSE++) and not divided
by the batch size. Ours: captions of the same image (equal `image_id`) are not negatives (the reference counts them).

`margin='dynamic'` is the paper's L_ct (Eqs. 29-30), which the released code does not implement: pair (i, j) gets
the margin alpha_ct(P_ij) = gamma (e^beta - e^(beta P_ij)) / (e^beta - 1) in both directions, where P_ij is the
prior similarity of caption j to image i's 5 reference captions. P follows the authors' script
(`Rct/generate_t2i_sim_matrix.py`): P = (score1 + score2) / 2 with
  score1 = 1 if the caption equals a reference, else NLTK's sentence BLEU-4 (uniform weights, no smoothing:
           0 when some n-gram order has no match; brevity penalty against the closest reference length),
  score2 = mean over references with at least one content word of |set(ref) & set(caption)| / len(ref), on
           content words (stopwords removed).
Ours: the script runs on NLTK-tokenised, Porter-stemmed words; here P is computed inside the train step on token
ids (`batch['caption_set']` (B, 5, T) and `batch['tokens']`), so words are the vocabulary's ids (no stemming),
"stopword" means `<unk>` (the papers' vocabulary maps every stopword, and every rare word, to `<unk>`), BLEU counts
`<unk>` as a word (the script's BLEU keeps stopwords), and score2 is 0 for an image without content words (the
script's mean of nothing is NaN). BLEU is computed exactly on the ids by comparing n-gram positions, one image at a
time (`lax.map`), O(B^2 5 T^2) comparisons per step; the prior carries no gradient.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from rsalign_jax.losses import base
from rsalign_jax.similarity import upcast
from rsalign_jax.losses.triplet import dynamic_margin, hinge_costs

BLEU_ORDER = 4


def _shift_and(matches, base, n):
  """n-gram matches from (n-1)-gram ones: also the tokens n-1 after both start positions match (axes -3, -1)."""
  k = n - 1
  pad = [(0, 0)] * base.ndim
  pad[-3] = pad[-1] = (0, k)
  return matches & jnp.pad(base[..., k:, :, k:], pad)


def _self_counts(hypotheses):
  """(B, N, T): for each caption, order n and position p, how often the n-gram starting at p occurs in it (0 where
  no n-gram starts)."""
  valid = hypotheses != 0
  base = (hypotheses[:, :, None] == hypotheses[:, None, :]) & valid[:, :, None] & valid[:, None, :]
  base = base[:, :, None, :]  # (B, T, 1, T): the (positions, -, positions) layout of `_shift_and`
  counts, matches = [], base
  for n in range(1, BLEU_ORDER + 1):
    if n > 1:
      matches = _shift_and(matches, base, n)
    counts.append(jnp.sum(matches, axis=(2, 3)))
  return jnp.stack(counts, axis=1)


def _image_prior(references, hypotheses, self_counts, unk_token):
  """(B,) prior of every caption (B, T) to one image's references (R, T)."""
  ref_valid = references != 0
  hyp_lengths = jnp.sum(hypotheses != 0, axis=-1)
  ref_lengths = jnp.sum(ref_valid, axis=-1)

  exact = jnp.any(jnp.all(references[:, None, :] == hypotheses[None, :, :], axis=-1), axis=0)

  # score2: distinct content words of each reference found in the caption, over the reference's content words.
  content = ref_valid & (references != unk_token)
  earlier = jnp.tril(jnp.ones((references.shape[1],) * 2, bool), -1)
  repeated = jnp.any((references[:, :, None] == references[:, None, :]) & earlier, axis=-1)
  first = content & ~repeated
  found = jnp.any(references[:, :, None, None] == hypotheses[None, None], axis=-1)  # (R, T, B)
  shared = jnp.sum(found & first[:, :, None], axis=1)
  words = jnp.sum(content, axis=-1)
  ratios = jnp.where(words[:, None] > 0, shared / jnp.maximum(words, 1)[:, None], 0.0)
  counted = jnp.sum(words > 0)
  overlap = jnp.sum(ratios, axis=0) / jnp.maximum(counted, 1)

  # BLEU: clipped n-gram counts, sum over caption positions p of min(count in caption, max count in a reference)
  # / count in caption (each distinct n-gram contributes its clipped count once).
  base = (references[:, :, None, None] == hypotheses[None, None]) & ref_valid[:, :, None, None]  # (R, T, B, T)
  log_precision, all_matched, matches = 0.0, True, base
  for n in range(1, BLEU_ORDER + 1):
    if n > 1:
      matches = _shift_and(matches, base, n)
    in_refs = jnp.max(jnp.sum(matches, axis=1), axis=0)  # (B, T)
    own = self_counts[:, n - 1]
    clipped = jnp.sum(jnp.minimum(own, in_refs) / jnp.maximum(own, 1), axis=-1)
    total = jnp.maximum(hyp_lengths - n + 1, 1)
    all_matched = all_matched & (clipped > 0)
    log_precision = log_precision + jnp.log(jnp.where(clipped > 0, clipped / total, 1.0)) / BLEU_ORDER
  distance = jnp.abs(ref_lengths[:, None] - hyp_lengths[None])  # (R, B)
  closest = jnp.min(jnp.where(distance == jnp.min(distance, axis=0), ref_lengths[:, None], jnp.iinfo(jnp.int32).max),
                    axis=0)
  brevity = jnp.where(hyp_lengths > closest, 1.0, jnp.exp(1 - closest / jnp.maximum(hyp_lengths, 1)))
  bleu = jnp.where(all_matched, brevity * jnp.exp(log_precision), 0.0)

  return (jnp.where(exact, 1.0, bleu) + overlap) / 2


def prior_similarity(caption_sets, captions, *, unk_token):
  """(B_img, B_cap) prior P of caption j to image i's references (module docstring), in [0, 1].

  caption_sets: (B_img, R, T) token ids of each image's references; captions: (B_cap, T); 0 = padding.
  """
  if caption_sets.ndim != 3 or caption_sets.shape[-1] != captions.shape[-1]:
    raise ValueError(f"batch['caption_set'] {caption_sets.shape}: expected (B, 5, T) with T = tokens' "
                     f"{captions.shape[-1]}")
  self_counts = _self_counts(captions)
  return jax.lax.map(lambda refs: _image_prior(refs, captions, self_counts, unk_token), caption_sets)


class Objective(base.Objective):
  """AMFMN's hinge loss on `outputs['scores']` (module docstring).

  margin: a float, or 'dynamic' for alpha_ct(P) with `gamma` (max margin) and `beta` (decay), paper defaults
  0.6 / 5; the dynamic margin reads the batch's `caption_set` field and treats `unk_token` (the tokenizer's
  `<unk>` id, which `from_config` fills in) like a stopword.
  """
  margin: float | str = 0.2
  max_violation: bool = False
  gamma: float = 0.6
  beta: float = 5.0
  unk_token: int = -1

  @classmethod
  def from_config(cls, loss_config, tokenizer):
    return cls(**loss_config, unk_token=-1 if tokenizer is None else tokenizer.unk_id)

  @property
  def batch_fields(self):
    return ("caption_set",) if self.margin == "dynamic" else ()

  @nn.compact
  def __call__(self, outputs, batch):
    scores = upcast(outputs["scores"])
    ids = batch["image_id"]
    negatives = ids[:, None] != ids[None, :]
    metrics = {}
    if self.margin == "dynamic":
      if self.unk_token < 0:
        raise ValueError("loss.margin='dynamic' needs the tokenizer's <unk> id (Objective.from_config(loss, "
                         "tokenizer) sets unk_token)")
      prior = prior_similarity(batch["caption_set"], batch["tokens"], unk_token=self.unk_token)
      margins = dynamic_margin(prior, gamma=self.gamma, beta=self.beta)
      metrics["mean_negative_margin"] = jnp.sum(jnp.where(negatives, margins, 0.0)) / jnp.maximum(
          jnp.sum(negatives), 1)
    elif isinstance(self.margin, str):
      raise ValueError(f"loss.margin={self.margin!r}: expected a number or 'dynamic'")
    else:
      margins = self.margin
    cost_caption, cost_image = hinge_costs(scores, margins, negatives)
    if self.max_violation:
      loss = jnp.sum(jnp.max(cost_caption, axis=1)) + jnp.sum(jnp.max(cost_image, axis=0))
    else:
      loss = jnp.sum(cost_caption) + jnp.sum(cost_image)
    positives = jnp.diagonal(scores)
    metrics["positive_score"] = jnp.mean(positives)
    metrics["negative_score"] = jnp.sum(jnp.where(negatives, scores, 0.0)) / jnp.maximum(jnp.sum(negatives), 1)
    return loss, metrics
