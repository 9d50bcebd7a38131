"""Embedding dataset splits, free-text queries and image files with a model's jitted towers, outside the evaluator.

Used by export, search and the gallery pictures. `setup` is the trainer's `Setup` (its config, vocab, model, mesh
and `retrieval` functions: the same jitted towers the evaluator runs, so these embeddings are the ones the metrics
come from); inputs go through in global batches of `eval_batch_size` (rounded up to a multiple of the device count)
sharded over the mesh. `image_batches` and `text_batches` know how many rows they hold, so `embed` logs progress
over them (`runtime.progress`).
"""
import jax
import numpy as np
import PIL.Image

from rsalign_jax.data import preprocessing
from rsalign_jax.runtime import progress as progress_lib
from rsalign_jax.runtime import sharding as sharding_lib

KINDS = ("images", "texts", "image_codes", "text_codes")


def encode_queries(setup, queries):
  """Free-text queries -> (tokens, lengths); an empty query, or one without a word the vocabulary knows, is an
  error."""
  vocab = setup.vocab
  tokens, lengths, _ = vocab.encode_batch(list(queries), setup.config.text.max_len)
  word2idx = getattr(vocab, "word2idx", None)  # word vocabularies; WordPiece splits any word into known pieces
  for query, row, length in zip(queries, tokens, lengths):
    if not query.strip():
      raise ValueError("--query: empty query; expected a sentence such as 'many planes are parked near a runway'")
    if word2idx is not None and set(row[:length].tolist()) <= {word2idx["<unk>"]}:
      raise ValueError(f"--query={query!r}: none of its words is in the model's vocabulary of {vocab.size - 2} "
                       "words (from the training captions); describe the scene with other words")
  encoder = setup.text_encoder(None, None)
  if encoder is not vocab:  # cached text trunk: its outputs in place of the token ids
    tokens, lengths, _ = encoder.encode_batch(list(queries), setup.config.text.max_len)
  return tokens, lengths


def free_text_fields(setup):
  """The (empty) fields of free-text queries: an error for models whose text tower needs per-image fields."""
  text_names = setup.model.TEXT_FIELDS
  if text_names:
    raise ValueError(f"model {setup.config.model_name!r}: its text tower needs the per-image fields {text_names}, "
                     "which a free-text query does not have; query with an image instead")
  return {}


def read_image_files(setup, images):
  """Image files (paths) or RGB arrays ((H, W, 3) uint8, as decoding a file gives) -> model image inputs:
  (N, H, W, 3) float32 with the config's eval preprocessing (then the image trunk's outputs, when the model reads
  cached ones)."""
  image_names = setup.model.IMAGE_FIELDS
  if image_names:
    raise ValueError(f"model {setup.config.model_name!r}: its image tower needs the per-image fields "
                     f"{image_names}, which an image file does not have")
  pp = preprocessing.parse(setup.config.input.pp_eval)
  images = np.stack([_preprocess(pp, image) for image in images])
  if setup.trunk_cache is not None and "image" in setup.trunk_cache.towers:
    return setup.trunk_cache.image_outputs(images)
  return images


def _preprocess(pp, image):
  """`pp` of an image file's bytes, or of an RGB array as is (the `decode` op passes arrays through)."""
  rng = np.random.default_rng(0)  # eval preprocessing is deterministic; ops take an rng for uniformity
  if isinstance(image, np.ndarray):
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise ValueError(f"image array of shape {image.shape} and dtype {image.dtype}: expected (H, W, 3) uint8 RGB")
    return pp(image, rng)
  try:
    with open(image, "rb") as f:
      return pp(f.read(), rng)
  except FileNotFoundError:
    raise FileNotFoundError(f"--image={image}: no such file") from None
  except PIL.UnidentifiedImageError:
    raise ValueError(f"--image={image}: not an image file PIL can read (PNG, JPEG, TIFF, ...)") from None


def batch_size(setup):
  """The eval batch rounded up to a multiple of the device count (global batches split evenly)."""
  return -(-setup.config.eval_batch_size // jax.device_count()) * jax.device_count()


class Batches:
  """An iterable of batches with `rows` rows in all, described by `what` (e.g. 'test images') in progress lines."""

  def __init__(self, what, rows, batches):
    self.what, self.rows, self._batches = what, rows, batches

  def __iter__(self):
    return iter(self._batches)


def image_batches(setup, data):
  """`Batches` of (images, fields) of a split's images with the eval preprocessing."""
  pp = preprocessing.parse(setup.pp_eval)
  rng = np.random.default_rng(0)  # eval preprocessing is deterministic; ops take an rng for uniformity
  size, total = batch_size(setup), data.index.num_images

  def batches():
    for start in range(0, total, size):
      stop = min(start + size, total)
      images = np.stack([pp(data.inputs[i]["image"], rng) for i in range(start, stop)])
      yield images, {name: value[start:stop] for name, value in data.image_fields.items()}

  return Batches(f"{data.name} images", total, batches())


def text_batches(setup, tokens, lengths, fields, what="captions"):
  """`Batches` of (tokens, lengths, fields) of captions."""
  size = batch_size(setup)

  def batches():
    for start in range(0, len(tokens), size):
      stop = start + size
      yield tokens[start:stop], lengths[start:stop], {name: value[start:stop] for name, value in fields.items()}

  return Batches(what, len(tokens), batches())


def embed(setup, variables, kind, batches):
  """Yields a tower's numpy outputs (pytrees of (rows, ...) arrays) for each batch of `batches`, logging progress
  over `Batches`.

  kind: 'images' / 'texts' (the evaluator's embeddings; batches from `image_batches` / `text_batches`) or
  'image_codes' / 'text_codes' (a hashing model's relaxed codes in (-1, 1); their signs are the binary codes).
  """
  fn = _tower(setup, kind)
  size = batch_size(setup)
  sharding = sharding_lib.batch_sharding(setup.mesh)
  progress = None
  if isinstance(batches, Batches):
    verb = "embedding" if kind in ("images", "texts") else "hash codes of"
    progress = progress_lib.Progress(f"{verb} {batches.what}", batches.rows)
  for arrays in batches:
    rows = len(jax.tree.leaves(arrays)[0])
    outputs = fn(variables, *sharding_lib.padded_global_batch(arrays, size, sharding))
    yield jax.tree.map(lambda x: np.asarray(x)[:rows], outputs)
    if progress is not None:
      progress.update(rows)
  if progress is not None:
    progress.done()


def embed_all(setup, variables, kind, batches):
  """All of `embed`'s outputs, concatenated."""
  return jax.tree.map(lambda *parts: np.concatenate(parts), *embed(setup, variables, kind, batches))


def _tower(setup, kind):
  if kind not in KINDS:
    raise ValueError(f"unknown tower output {kind!r}; expected one of {KINDS}")
  if kind in ("images", "texts"):
    return getattr(setup.retrieval, f"embed_{kind}")
  if not setup.model.HASH_CODES:
    raise ValueError(f"model {setup.config.model_name!r} has no hash codes (no image_codes/text_codes methods); "
                     "use its float embeddings")
  key = (id(setup.model), setup.mesh, kind)
  if key not in _CODE_TOWERS or _CODE_TOWERS[key][0] is not setup.model:
    _CODE_TOWERS[key] = (setup.model, _code_tower(setup.model, setup.mesh, kind))
  return _CODE_TOWERS[key][1]


_CODE_TOWERS = {}  # (id(model), mesh, kind) -> (model, jitted fn): compiled once per model object


def _code_tower(model, mesh, kind):
  replicated = sharding_lib.replicated(mesh)
  if kind == "image_codes":
    return jax.jit(lambda v, images, fields: model.apply(v, images, **fields, method=kind), out_shardings=replicated)
  return jax.jit(lambda v, tokens, lengths, fields: model.apply(v, tokens, lengths, **fields, method=kind),
                 out_shardings=replicated)
