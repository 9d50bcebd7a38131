"""Hash-code retrieval for content-based RS image retrieval (CBRSIR): packed codes, exact Hamming top-k, a
two-level index, and mAP@K / P@K.

- `pack_codes`: K-bit sign codes (bit = code >= 0) -> (N, ceil(K/32)) uint32 words, bit j of word w = bit 32w + j.
- `hamming_top_k` / `cosine_top_k`: exhaustive search, chunked over queries (XOR + popcount for Hamming). Ties go to
  the lower gallery index, so results are exact and deterministic.
- `TwoLevelIndex` (our reading of CCLS2T's "hierarchical semantic tree", docs/METHODS.md Part B §4.2.5): a coarse
  level of clusters (k-means over the +-1 code vectors, where squared Euclidean distance is 4x Hamming, or the gallery's
  class labels); a query probes its `probe` nearest cluster centres, ranks their members by Hamming distance and
  optionally re-ranks the best `rerank_depth` of them by float cosine. Probing every cluster without re-ranking is
  exactly the exhaustive Hamming search.
- `retrieval_scores`: the standard CBRSIR protocol scores image->image rankings where relevant = same scene class
  (queries: test images; gallery: train images). P@K = relevant in the top K / K. AP@K follows the hashing
  literature (HashNet's mAP@topK): the mean of P@i over the ranks i <= K that hold a relevant item, 0 when none
  does; mAP@K averages it over queries.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

WORD_BITS = 32


def pack_codes(codes):
  """(N, K) real codes (or +-1 / bool bits) -> (N, ceil(K / 32)) uint32; unused high bits of the last word are 0."""
  codes = np.asarray(codes)
  if codes.ndim != 2:
    raise ValueError(f"codes: expected a (N, K) array, got shape {codes.shape}")
  bits = codes if codes.dtype == bool else codes >= 0
  num_words = -(-bits.shape[1] // WORD_BITS)
  bits = np.pad(bits, ((0, 0), (0, num_words * WORD_BITS - bits.shape[1])))
  weights = np.left_shift(np.uint32(1), np.arange(WORD_BITS, dtype=np.uint32))
  return (bits.reshape(len(bits), num_words, WORD_BITS) * weights).sum(-1, dtype=np.uint32)


def hamming_distances(query_words, gallery_words):
  """(Q, W) x (N, W) packed codes -> (Q, N) int32 Hamming distances (XOR + popcount)."""
  xor = jnp.bitwise_xor(query_words[:, None, :], gallery_words[None, :, :])
  return jnp.sum(jax.lax.population_count(xor), axis=-1, dtype=jnp.int32)


def _check_key_range(num_bits, gallery_size):
  if (num_bits + 2) * gallery_size >= 2**31:
    raise ValueError(f"{gallery_size} gallery items x {num_bits} bits: int32 ranking keys would overflow")


@functools.partial(jax.jit, static_argnames=("k",))
def _hamming_top_k(query_words, gallery_words, k):
  distances = hamming_distances(query_words, gallery_words)
  keys = distances * gallery_words.shape[0] + jnp.arange(gallery_words.shape[0], dtype=jnp.int32)
  neg_keys, indices = jax.lax.top_k(-keys, k)
  return indices, -neg_keys // gallery_words.shape[0]


def _chunked(fn, queries, chunk_size):
  outs = [fn(*(q[i:i + chunk_size] for q in queries)) for i in range(0, len(queries[0]), chunk_size)]
  return tuple(np.concatenate([np.asarray(o[j]) for o in outs]) for j in range(len(outs[0])))


def hamming_top_k(query_words, gallery_words, k, *, chunk_size=256):
  """Exhaustive Hamming search: (indices (Q, k) int32, distances (Q, k) int32), ties by lower gallery index."""
  k = _check_k(k, len(gallery_words))
  _check_key_range(gallery_words.shape[1] * WORD_BITS, len(gallery_words))
  gallery = jnp.asarray(gallery_words)
  return _chunked(lambda q: _hamming_top_k(jnp.asarray(q), gallery, k), (np.asarray(query_words),), chunk_size)


@functools.partial(jax.jit, static_argnames=("k",))
def _cosine_top_k(queries, gallery, k):
  scores = jnp.matmul(_normalize(queries), _normalize(gallery).T, precision=jax.lax.Precision.HIGHEST)
  scores, indices = jax.lax.top_k(scores, k)  # lax.top_k puts the lower index first among equal values
  return indices, scores


def _normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine_top_k(query_embeddings, gallery_embeddings, k, *, chunk_size=256):
  """Exhaustive float search: (indices (Q, k) int32, cosines (Q, k)), ties by lower gallery index."""
  k = _check_k(k, len(gallery_embeddings))
  gallery = jnp.asarray(gallery_embeddings, jnp.float32)
  return _chunked(lambda q: _cosine_top_k(jnp.asarray(q, jnp.float32), gallery, k),
                  (np.asarray(query_embeddings),), chunk_size)


def _check_k(k, gallery_size):
  if not 1 <= k <= gallery_size:
    raise ValueError(f"k={k}: expected 1 <= k <= the {gallery_size} gallery items")
  return int(k)


def kmeans(points, num_clusters, *, iterations=20, seed=0):
  """Lloyd's k-means on (N, K) float points from `num_clusters` distinct random points; an empty cluster keeps its
  centre. Returns (centres (C, K) float32, assignment (N,) int32)."""
  points = np.asarray(points, np.float32)
  if not 1 <= num_clusters <= len(points):
    raise ValueError(f"num_clusters={num_clusters}: expected 1..{len(points)} (the gallery size)")
  rng = np.random.default_rng(seed)
  centres = points[rng.choice(len(points), num_clusters, replace=False)]
  assignment = np.zeros(len(points), np.int32)
  for _ in range(iterations):
    distances = (points**2).sum(1)[:, None] - 2 * points @ centres.T + (centres**2).sum(1)[None]
    assignment = distances.argmin(1).astype(np.int32)
    for c in range(num_clusters):
      members = points[assignment == c]
      if len(members):
        centres[c] = members.mean(0)
  return centres, assignment


@dataclasses.dataclass(frozen=True)
class TwoLevelIndex:
  """Coarse clusters over the gallery's codes, Hamming ranking inside the probed clusters (see module docstring)."""
  words: np.ndarray  # (N, W) packed gallery codes
  num_bits: int
  centres: np.ndarray  # (C, K) cluster centres in +-1 code space
  members: np.ndarray  # (C, M) gallery indices of each cluster, ascending, padded with -1
  embeddings: np.ndarray | None  # (N, D) L2-normalised gallery embeddings for the re-rank, or None

  @classmethod
  def build(cls, codes, *, num_clusters=None, labels=None, embeddings=None, iterations=20, seed=0):
    """From (N, K) gallery codes: k-means clusters (`num_clusters`) or one cluster per class (`labels` (N,))."""
    signs = _signs(codes)
    if (num_clusters is None) == (labels is None):
      raise ValueError("TwoLevelIndex.build: give exactly one of num_clusters (k-means) or labels (class clusters)")
    if labels is None:
      centres, assignment = kmeans(signs, num_clusters, iterations=iterations, seed=seed)
    else:
      classes, assignment = np.unique(np.asarray(labels), return_inverse=True)
      centres = np.stack([signs[assignment == c].mean(0) for c in range(len(classes))])
    groups = [np.flatnonzero(assignment == c) for c in range(len(centres))]
    members = np.full((len(groups), max(len(g) for g in groups)), -1, np.int32)
    for c, group in enumerate(groups):
      members[c, :len(group)] = group
    if embeddings is not None:
      embeddings = np.asarray(_normalize(jnp.asarray(embeddings, jnp.float32)))
    return cls(pack_codes(signs), signs.shape[1], centres.astype(np.float32), members, embeddings)

  @property
  def num_clusters(self):
    return len(self.centres)

  def mean_candidates(self, query_codes, probe):
    """The mean number of gallery items a query scores by Hamming distance at `probe`."""
    probed = np.asarray(_probe_clusters(jnp.asarray(_signs(query_codes)), jnp.asarray(self.centres), probe))
    return float((self.members >= 0).sum(1)[probed].sum(1).mean())

  def search(self, query_codes, k, *, probe, rerank_depth=0, query_embeddings=None, chunk_size=256):
    """Top-k gallery indices (Q, k) int32 (-1 where the probed clusters hold fewer than k items).

    probe: clusters visited per query. rerank_depth: if > 0, the best `rerank_depth` by Hamming (>= k) are
    re-ranked by cosine of `query_embeddings` with the gallery embeddings given to `build`.
    """
    if not 1 <= probe <= self.num_clusters:
      raise ValueError(f"probe={probe}: expected 1..{self.num_clusters} (the number of clusters)")
    if rerank_depth and (self.embeddings is None or query_embeddings is None):
      raise ValueError("rerank_depth > 0 needs embeddings at build time and query_embeddings")
    if rerank_depth and rerank_depth < k:
      raise ValueError(f"rerank_depth={rerank_depth} must be >= k={k}")
    _check_key_range(self.num_bits, len(self.words))
    signs = _signs(query_codes)
    arrays = (signs, pack_codes(signs)) + ((np.asarray(query_embeddings, np.float32),) if rerank_depth else ())
    search = functools.partial(_two_level_search, centres=jnp.asarray(self.centres),
                               members=jnp.asarray(self.members), words=jnp.asarray(self.words),
                               embeddings=jnp.asarray(self.embeddings) if rerank_depth else None,
                               k=int(k), probe=int(probe), depth=int(rerank_depth or k))
    return _chunked(lambda *q: (search(*(jnp.asarray(a) for a in q)),), arrays, chunk_size)[0]


def _signs(codes):
  return np.where(np.asarray(codes) >= 0, 1.0, -1.0).astype(np.float32)


@functools.partial(jax.jit, static_argnames=("probe",))
def _probe_clusters(signs, centres, probe):
  """The `probe` nearest centres of each query by squared Euclidean distance in +-1 space (ties: lower cluster)."""
  coarse = jnp.sum(centres**2, 1)[None] - 2 * jnp.matmul(signs, centres.T, precision=jax.lax.Precision.HIGHEST)
  return jax.lax.top_k(-coarse, probe)[1]


@functools.partial(jax.jit, static_argnames=("k", "probe", "depth"))
def _two_level_search(signs, query_words, query_embeddings=None, *, centres, members, words, embeddings, k, probe,
                      depth):
  num_gallery, num_queries = words.shape[0], signs.shape[0]
  candidates = members[_probe_clusters(signs, centres, probe)].reshape(num_queries, -1)  # (Q, probe * M), -1 = padding
  valid = candidates >= 0
  safe = jnp.where(valid, candidates, 0)
  distances = jnp.sum(jax.lax.population_count(jnp.bitwise_xor(words[safe], query_words[:, None, :])), axis=-1,
                      dtype=jnp.int32)
  past_every_key = (signs.shape[1] + 1) * num_gallery
  keys = jnp.where(valid, distances * num_gallery + safe, past_every_key)
  neg_keys, positions = jax.lax.top_k(-keys, min(depth, candidates.shape[1]))
  picked = jnp.where(-neg_keys < past_every_key, jnp.take_along_axis(candidates, positions, axis=1), -1)
  if embeddings is not None:
    gallery = embeddings[jnp.maximum(picked, 0)]  # (Q, depth, D)
    cosines = jnp.einsum("qd,qnd->qn", _normalize(query_embeddings), gallery, precision=jax.lax.Precision.HIGHEST)
    _, order = jax.lax.top_k(jnp.where(picked >= 0, cosines, -jnp.inf), min(k, picked.shape[1]))
    picked = jnp.take_along_axis(picked, order, axis=1)
  picked = picked[:, :k]
  return jnp.pad(picked, ((0, 0), (0, k - picked.shape[1])), constant_values=-1)


def retrieval_scores(ranked, query_labels, gallery_labels, ks):
  """{f"mAP@{K}", f"P@{K}"} in percent for (Q, >= max K) ranked gallery indices (-1 = no item: not relevant)."""
  ranked = np.asarray(ranked)
  if ranked.ndim != 2 or ranked.shape[1] < max(ks):
    raise ValueError(f"ranked: expected (queries, >= {max(ks)}) indices, got shape {ranked.shape}")
  gallery_labels = np.asarray(gallery_labels)
  relevant = (ranked >= 0) & (gallery_labels[np.maximum(ranked, 0)] == np.asarray(query_labels)[:, None])
  scores = {}
  for k in ks:
    hits = relevant[:, :k]
    cumulative = np.cumsum(hits, axis=1)
    precision_at_i = cumulative / np.arange(1, k + 1)
    num_hits = cumulative[:, -1]
    average_precision = np.where(num_hits > 0, (precision_at_i * hits).sum(1) / np.maximum(num_hits, 1), 0.0)
    scores[f"mAP@{k}"] = 100.0 * float(average_precision.mean())
    scores[f"P@{k}"] = 100.0 * float(num_hits.mean() / k)
  return scores
