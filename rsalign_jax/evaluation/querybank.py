"""Querybank normalisation (QB-Norm, Bogolin et al., CVPR 2022): test-time similarity normalisation against hubs.

A gallery item that is near many queries (a hub) crowds the top of most rankings. The inverted softmax divides each
query's score to gallery item g by how strongly a bank of other queries (drawn from the training split, never the
test queries) is drawn to g:

  IS(q, g) = exp(beta s(q, g)) / sum_{b in bank} exp(beta s(b, g)),

ranked here as its logarithm, beta s(q, g) - logsumexp_b beta s(b, g). The dynamic inverted softmax applies it only
to queries whose best raw match lies in the activation set (the gallery items that are some bank query's best match)
and leaves the other queries' scores as they were, which the paper found never to hurt. Only the ranking within a
query matters to the retrieval metrics, so rows on the two scales can sit in one matrix.
"""
import numpy as np


def normalise(scores: np.ndarray, bank_scores: np.ndarray, beta: float, dynamic: bool = True) -> np.ndarray:
  """(Q, G) query scores normalised against the (B, G) scores of a query bank to the same gallery."""
  scores, bank_scores = np.asarray(scores, np.float64), np.asarray(bank_scores, np.float64)
  if scores.ndim != 2 or bank_scores.ndim != 2 or scores.shape[1] != bank_scores.shape[1]:
    raise ValueError(f"query scores {scores.shape} and bank scores {bank_scores.shape}: expected (Q, G) and (B, G)")
  if not beta > 0:
    raise ValueError(f"querybank beta={beta}: expected a positive inverse temperature")
  bank_logits = beta * bank_scores
  top = bank_logits.max(axis=0)
  normalised = beta * scores - (top + np.log(np.exp(bank_logits - top).sum(axis=0)))[None, :]
  if not dynamic:
    return normalised
  activated = np.zeros(scores.shape[1], bool)
  activated[np.argmax(bank_scores, axis=1)] = True
  return np.where(activated[np.argmax(scores, axis=1)][:, None], normalised, scores)
