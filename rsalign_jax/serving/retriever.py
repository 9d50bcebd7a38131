"""The Python API of a trained model: `rsalign_jax.load(workdir)` -> a `Retriever`.

A `Retriever` embeds image files or arrays and free text, scores them, searches a gallery exactly and classifies
images zero-shot from class names (`classify`, as `--mode=zeroshot` does). It needs only the workdir (its
config.json, tokenizer, inputs.json and checkpoint: `experiment.build_setup(training=False)`), and runs on whatever
devices exist with the trainer's mesh, the same jitted towers, `score` and sharded exact top-k as `--mode=search`,
so its scores are that mode's. Embeddings are what the model's `score` takes: for a model that scores by cosine
(`SCORE = 'cosine'`), L2-normalise them before putting them in an inner-product index (as `--mode=export` does).
"""
import dataclasses
import os

import jax
import numpy as np

from rsalign_jax import configlib
from rsalign_jax.evaluation import topk
from rsalign_jax.modes import export as export_lib
from rsalign_jax.modes import trained as trained_lib
from rsalign_jax.modes import zeroshot
from rsalign_jax.serving import embedding


@dataclasses.dataclass(frozen=True)
class Match:
  """One search result: the gallery row, its score (higher is better) and the gallery item (a caption, an image
  path, or None for an image given as an array)."""
  row: int
  score: float
  item: object


GALLERY_KINDS = ("images", "texts")


@dataclasses.dataclass(frozen=True)
class Gallery:
  """Embedded gallery items: 'images' (text queries rank them) or 'texts' (image queries rank them)."""
  kind: str
  embeddings: object  # (rows, ...) array or pytree of them, as the model's towers return
  items: list


def load(workdir, checkpoint="", config=None):
  """The trained model of `workdir`.

  checkpoint: '' (the one the trainer tests: best val if the run validated, else the last), 'best', 'last', or a
  checkpoint directory or step directory; config: the run's config (default: the workdir's config.json).
  """
  if config is None:
    config = configlib.load_resolved(workdir)
  return Retriever(trained_lib.load(config, workdir, checkpoint))


class Retriever:
  """A trained model's towers, score and exact search (see the module docstring)."""

  def __init__(self, trained):
    self._trained = trained
    self.setup = trained.setup

  @property
  def config(self):
    return self._trained.config

  @property
  def checkpoint(self):
    """The restored checkpoint, as results.json names it ("best val (step N)", "last" or a path)."""
    return self._trained.checkpoint

  @property
  def step(self):
    return self._trained.step

  def encode_images(self, images):
    """Image files (paths) or RGB arrays ((H, W, 3) uint8, or one (N, H, W, 3) array) -> image embeddings, one row
    per image in order, with the config's eval preprocessing."""
    images = _image_list(images)
    size = embedding.batch_size(self.setup)
    batches = ((embedding.read_image_files(self.setup, images[start:start + size]), {})
               for start in range(0, len(images), size))
    with jax.set_mesh(self.setup.mesh):
      return embedding.embed_all(self.setup, self._trained.variables, "images", batches)

  def encode_texts(self, texts):
    """Free texts (a list of str) -> text embeddings, one row per text in order."""
    texts = _text_list(texts)
    tokens, lengths = embedding.encode_queries(self.setup, texts)
    batches = embedding.text_batches(self.setup, tokens, lengths, embedding.free_text_fields(self.setup))
    with jax.set_mesh(self.setup.mesh):
      return embedding.embed_all(self.setup, self._trained.variables, "texts", batches)

  def score(self, image_embeddings, text_embeddings):
    """(images, texts) scores of `encode_images` and `encode_texts` outputs: the model's `score` (higher is
    better)."""
    with jax.set_mesh(self.setup.mesh):
      return np.asarray(self.setup.retrieval.score(self._trained.variables, image_embeddings, text_embeddings))

  def image_gallery(self, images):
    """A gallery of image files or arrays, for text queries."""
    images = _image_list(images)
    items = [None if isinstance(image, np.ndarray) else os.fspath(image) for image in images]
    return Gallery("images", self.encode_images(images), items)

  def text_gallery(self, texts):
    """A gallery of captions, for image queries."""
    texts = _text_list(texts)
    return Gallery("texts", self.encode_texts(texts), texts)

  def export_gallery(self, export_dir, kind="images"):
    """The images (or kind='texts': the captions) of an export of this model (`--mode=export`), memory-mapped."""
    if kind not in GALLERY_KINDS:
      raise ValueError(f"kind={kind!r}: expected one of {GALLERY_KINDS}")
    manifest, arrays = export_lib.read(export_dir)
    if manifest["model"] != self.config.model_name:
      raise ValueError(f"{export_dir} holds {manifest['model']!r} embeddings; this model is "
                       f"{self.config.model_name!r}")
    if kind == "images":
      return Gallery(kind, arrays["image_embeddings"], manifest["images"]["filename"])
    return Gallery(kind, arrays["caption_embeddings"], manifest["captions"]["text"])

  def search(self, queries, gallery, k=5):
    """The k best gallery items of each query, best first, as lists of `Match`: texts (a str or a list of them)
    against an `image_gallery`, images (paths or arrays, as `encode_images` takes) against a `text_gallery`."""
    if not isinstance(gallery, Gallery):
      raise TypeError(f"gallery: expected a Gallery from image_gallery(...) or text_gallery(...), got "
                      f"{type(gallery).__name__}")
    text_queries = gallery.kind == "images"
    query = self.encode_texts(queries) if text_queries else self.encode_images(queries)
    with jax.set_mesh(self.setup.mesh):
      scores, rows = topk.exact_topk(query, gallery.embeddings, k, variables=self._trained.variables,
                                     score_fn=topk.ModelScore(self.setup.model, text_queries=text_queries))
    return [[Match(int(row), float(score), gallery.items[row]) for score, row in zip(query_scores, query_rows)]
            for query_scores, query_rows in zip(scores, rows)]

  def classify(self, images, classnames, templates=zeroshot.DEFAULT_TEMPLATES, k=5):
    """Zero-shot classification (`--mode=zeroshot`'s prompts, ensembling and scores): the k best of `classnames` for
    each image (paths or arrays, as `encode_images` takes), best first, as lists of `Match` whose row is the class
    index and item the class name."""
    classnames, templates = _text_list(classnames), zeroshot.check_templates(_text_list(templates), "templates")
    images = self.encode_images(images)
    with jax.set_mesh(self.setup.mesh):
      texts = zeroshot.embed_prompts(self.setup, self._trained.variables, classnames, templates)
      scores = zeroshot.class_scores(self.setup, self._trained.variables, images, texts, len(templates))
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[Match(int(row), float(image_scores[row]), classnames[row]) for row in rows]
            for image_scores, rows in zip(scores, ranked)]


def _image_list(images):
  """A list of image paths / (H, W, 3) arrays from one of them, a list of them or an (N, H, W, 3) array."""
  if isinstance(images, np.ndarray):
    return list(images) if images.ndim == 4 else [images]
  if isinstance(images, (str, os.PathLike)):
    return [images]
  images = list(images)
  if not images:
    raise ValueError("images: expected at least one image path or array")
  return images


def _text_list(texts):
  texts = [texts] if isinstance(texts, str) else list(texts)
  if not texts or not all(isinstance(text, str) for text in texts):
    raise ValueError(f"texts: expected a str or a non-empty list of str, got {texts!r:.80}")
  return texts
