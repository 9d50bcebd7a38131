"""The retrieval evaluator: embed every image and every distinct caption once, score, rank (METHODS 1.7).

Identical caption strings are embedded once and share one column of scores, so they tie exactly and the metric's
expected-tie rule applies to them; it also saves work (RSICD's test set has 3,331 distinct strings in 5,465).
"""
import jax
import numpy as np

from rsalign_jax.data import preprocessing
from rsalign_jax.evaluation import metrics as metrics_lib
from rsalign_jax.runtime import progress as progress_lib
from rsalign_jax.runtime import sharding as sharding_lib

_CACHE_LIMIT_BYTES = 1 << 30


class RetrievalEvaluator:
  """Computes the papers' retrieval metrics of one split for given embedding and scoring functions.

  `embed_images(variables, images, fields)`, `embed_texts(variables, tokens, lengths, fields)` take global batches
  sharded over the mesh (`fields`: the model's per-image inputs, a dict of arrays, see `rsalign_jax.data.fields`)
  and return replicated embeddings; `score(variables, image_emb, text_emb)` returns a similarity block.

  With `views` > 1 (test-time augmentation) `pp_spec` turns each image into a stack of that many views (V, ...):
  every view is embedded, image embeddings are (N, V, ...), and an image's score is the mean of its views' scores.
  """

  def __init__(self, split, *, pp_spec, batch_size, mesh, views=1, score_chunk=1024):
    """split: a `data.splits.Split` (its `inputs` hold the images as the model reads them)."""
    self._name, self._source = split.name, split.inputs
    self._pp = preprocessing.parse(pp_spec)
    self._batch_size, self._views = batch_size, views
    self._image_rows = max(1, batch_size // views)  # images per embedding batch: their views fill one batch
    self._sharding = sharding_lib.batch_sharding(mesh)
    self._score_chunk = score_chunk
    self.index = split.index
    tokens, lengths = split.tokens, split.lengths
    self._image_fields = split.image_fields
    # With text fields (per-image inputs of the text tower) a caption string is only shared within its image.
    key = [tokens, lengths[:, None]] + ([self.index.record[:, None]] if split.text_fields else [])
    _, first, self._caption_to_unique = np.unique(np.concatenate(key, axis=1), axis=0, return_index=True,
                                                  return_inverse=True)
    self._unique_tokens, self._unique_lengths = tokens[first], lengths[first]
    self._text_fields = {name: values[first] for name, values in split.text_fields.items()}
    self._images = None

  @property
  def num_images(self):
    return self.index.num_images

  def release_inputs(self):
    """Frees the split's images (decoded, or a frozen trunk's cached outputs) when no more embeddings are needed; the
    index and caption columns stay, for scores already computed (an ensemble keeps its first member's)."""
    self._source = self._images = self._image_fields = None

  def _image_batches(self):
    if self._source is None:
      raise RuntimeError(f"{self._name}: the evaluator's inputs were released; build another to embed the split")
    if self._images is not None:
      yield from _batches(self._images, self._image_rows)
      return
    decoded, kept_bytes = [], 0  # kept for the next pass while they fit in _CACHE_LIMIT_BYTES
    rng = np.random.default_rng(0)  # eval preprocessing is deterministic; ops take an rng for uniformity
    for start in range(0, self.num_images, self._image_rows):
      stop = min(start + self._image_rows, self.num_images)
      batch = np.stack([self._pp(self._source[i]["image"], rng) for i in range(start, stop)])
      kept_bytes += batch.nbytes
      if decoded is not None and kept_bytes <= _CACHE_LIMIT_BYTES:
        decoded.append(batch)
      else:
        decoded = None
      yield batch
    if decoded is not None:
      self._images = np.concatenate(decoded)

  def _embed(self, fn, variables, batches, progress):
    out = []
    with progress:
      for arrays in batches:
        n = len(jax.tree.leaves(arrays)[0])
        embeddings = fn(variables, *sharding_lib.padded_global_batch(arrays, self._batch_size, self._sharding))
        out.append(np.asarray(embeddings)[:n])
        progress.update(n)
    return np.concatenate(out)

  def embeddings(self, variables, embed_images, embed_texts):
    """Returns (image embeddings (N, D), or (N, V, D) with `views` > 1, distinct-caption embeddings (U, D))."""
    batches = zip(self._image_batches(), _batches(self._image_fields, self._image_rows))
    if self._views > 1:  # each view embedded as an image of its own, with its image's fields
      batches = ((images.reshape((-1,) + images.shape[2:]),
                  jax.tree.map(lambda a: np.repeat(a, self._views, axis=0), fields)) for images, fields in batches)
    what = f"embedding {self._name} images" + (f" ({self._views} views each)" if self._views > 1 else "")
    images = self._embed(embed_images, variables, batches, progress_lib.Progress(what, self.num_images * self._views))
    if self._views > 1:
      images = images.reshape((self.num_images, self._views) + images.shape[1:])
    texts = self._embed(embed_texts, variables, _batches((self._unique_tokens, self._unique_lengths,
                                                           self._text_fields), self._batch_size),
                        progress_lib.Progress(f"embedding {self._name} distinct captions", len(self._unique_tokens)))
    return images, texts

  def similarity(self, variables, score, image_embeddings, text_embeddings):
    """The (N images, N captions) similarity matrix, scored in image chunks against the distinct captions."""
    return self.caption_columns(self.scores(variables, score, image_embeddings, text_embeddings))

  def scores(self, variables, score, image_embeddings, text_embeddings, what=None):
    """The (images, texts) scores of any two embedding sets (e.g. this split's images against a query bank's
    captions), in image chunks; with `views` > 1 each image's the mean over its views."""
    blocks = []
    with progress_lib.Progress(what or f"scoring {self._name} images", len(image_embeddings)) as progress:
      for i in range(0, len(image_embeddings), self._score_chunk):
        chunk = image_embeddings[i:i + self._score_chunk]
        if self._views > 1:
          block = sum(np.asarray(score(variables, chunk[:, v], text_embeddings), np.float32)
                      for v in range(self._views)) / self._views
        else:
          block = np.asarray(score(variables, chunk, text_embeddings))
        blocks.append(block)
        progress.update(len(block))
    return np.concatenate(blocks)

  def distinct_columns_of(self, other):
    """Indices of `other`'s distinct-caption columns in this evaluator's order (`other_scores[..., indices]`), for
    scores of one split from two models whose captions are keyed differently (token ids, or rows of a trunk cache)."""
    indices = np.zeros(len(self._unique_lengths), np.int64)
    indices[self._caption_to_unique] = other._caption_to_unique
    if (len(other._unique_lengths) != len(indices) or
        not np.array_equal(indices[self._caption_to_unique], other._caption_to_unique)):
      raise ValueError(f"{self._name}: the two models see different distinct captions ({len(indices)} and "
                       f"{len(other._unique_lengths)}, or grouped differently); their scores cannot be compared")
    return indices

  def caption_columns(self, distinct_caption_scores):
    """(..., distinct captions) -> (..., captions): each caption takes its distinct string's column."""
    return distinct_caption_scores[..., self._caption_to_unique]

  def run(self, variables, embed_images, embed_texts, score):
    image_embeddings, text_embeddings = self.embeddings(variables, embed_images, embed_texts)
    sim = self.similarity(variables, score, image_embeddings, text_embeddings)
    return metrics_lib.retrieval_metrics(sim, self.index.record)


def _batches(arrays, size):
  """Consecutive row slices of a pytree of arrays (an empty dict yields empty dicts forever)."""
  leaves = jax.tree.leaves(arrays)
  if not leaves:
    while True:
      yield arrays
  for start in range(0, len(leaves[0]), size):
    yield jax.tree.map(lambda a: a[start:start + size], arrays)


class Retrieval:
  """A model's jitted `embed_images`, `embed_texts` (replicated outputs over `mesh`) and `score`, shared by every
  evaluator of a run."""

  def __init__(self, model, mesh):
    replicated = sharding_lib.replicated(mesh)
    self.embed_images = jax.jit(
        lambda v, images, fields: model.apply(v, images, **fields, train=False, method="embed_images"),
        out_shardings=replicated)
    self.embed_texts = jax.jit(
        lambda v, tokens, lengths, fields: model.apply(v, tokens, lengths, **fields, train=False,
                                                       method="embed_texts"),
        out_shardings=replicated)
    self.score = jax.jit(lambda v, images, texts: model.apply(v, images, texts, method="score"))

  def evaluate(self, evaluator, variables):
    """`evaluator`'s metrics for the model's `variables`."""
    return evaluator.run(variables, self.embed_images, self.embed_texts, self.score)
