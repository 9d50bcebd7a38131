"""Frozen trunks computed once: train and evaluate a model's heads on cached trunk outputs.

A frozen tower (`model.frozen`) is a fixed function of its input, so recomputing it every step repeats the same
work: on a CPU it is most of each step (Lite0 + MiniLM forward passes are ~2 s of the floor's 2.1 s step). With
`config.trunk_cache.views = V > 0` the trainer runs each frozen trunk once (the model's `image_trunk` /
`text_trunk` methods) over every image and every distinct caption of the train, val and test splits, and rebuilds
the model with `precomputed=<the frozen towers>`, whose towers read those outputs instead of pixels and token ids.

Images: the eval preprocessing (`input.pp_eval`), then for the training split V dihedral views (rotations by 0, 90,
180, 270 degrees, then their mirror images; aerial scenes have no canonical orientation), of which each training
step draws one at random; val and test keep the plain view (their first `config.eval_views` views, in
`{split}.{N}views.npz`, for test-time augmentation). So `input.pp_train` is not used: the V views are the
augmentation. Captions: one output per distinct string (identical captions tie exactly, as the evaluator wants).

Files: `{trunk_cache.dir}/{tower}-{fingerprint}/{split}.npz` in `trunk_cache.dtype` (float16 by default: half the
memory; float32 reproduces the uncached run to rounding), where the fingerprint hashes everything that determines
the outputs (model config but its head fields, pretrained checkpoints, preprocessing, views, dataset, dtype), so
seeds and head variants share one cache and any change recomputes it. `dir` defaults to `trunk_cache` beside the
dataset's tfds build.
"""
import hashlib
import json
import os
import re

import jax
import numpy as np

from rsalign_jax import configlib
from rsalign_jax.data import preprocessing, sources
from rsalign_jax.models import base as model_base
from rsalign_jax.runtime import metric_writer
from rsalign_jax.runtime import progress as progress_lib
from rsalign_jax.runtime import sharding
from rsalign_jax.weights import trained as trained_weights

log = metric_writer.log
TRAIN_PP, EVAL_PP = "random_view", "view(0)"  # the preprocessing of cached image inputs


def enabled(config) -> bool:
  return bool(config.get("trunk_cache") and config.trunk_cache.get("views"))


def cached_towers(config) -> tuple[str, ...]:
  """The towers whose trunk outputs are cached: the frozen ones (an error if none is, or views is out of range)."""
  views = config.trunk_cache.views
  if not 1 <= views <= preprocessing.DIHEDRAL_VIEWS:
    raise ValueError(f"trunk_cache.views={views}: expected 1..{preprocessing.DIHEDRAL_VIEWS} dihedral views (0 turns "
                     "caching off)")
  frozen = tuple(t for t in model_base.TOWER_NAMES if t in config.model.get("frozen", ()))
  if not frozen:
    raise ValueError("trunk_cache.views > 0 caches frozen towers' outputs, but model.frozen names none; freeze "
                     "the image and/or text tower (e.g. frozen=image+text) or set trunk_cache.views=0")
  return frozen


def fingerprint(config, tower: str) -> str:
  """A short hash of everything that determines the tower's cached trunk outputs (any seed, any split, any heads:
  the model's HEAD_FIELDS, which towers are frozen and `init` entries filling only unfrozen parameters are left out,
  so a run fine-tuning one tower from another run's heads reuses the other tower's cache)."""
  init = {name: dict(entry) for name, entry in dict(config.get("init") or {}).items()
          if _fills_frozen_parameters(entry, config.optimizer.get("frozen", ()))}
  head_fields = model_base.model_class(config.model_name).HEAD_FIELDS
  model = {k: v for k, v in config.model.to_dict().items() if k not in (*head_fields, "frozen")}
  image = tower == "image"
  dataset = config.dataset.to_dict()
  if not dataset.get("corpus"):  # the corpus options change nothing without a corpus: keep earlier caches valid
    dataset = {k: v for k, v in dataset.items() if k not in configlib.CORPUS_FIELDS}
  keys = dict(model_name=config.model_name, model=model, init=init,
              compute_dtype=config.get("compute_dtype", "float32"), dataset=dataset,
              dtype=config.trunk_cache.get("dtype", "float16"), pp_eval=config.input.pp_eval if image else None,
              views=config.trunk_cache.views if image else None, text=None if image else config.text.to_dict())
  return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fills_frozen_parameters(entry, frozen_patterns) -> bool:
  """Whether an `init` entry may fill a parameter matching the optimizer's `frozen` regexes (the cached trunks'):
  a trained workdir's entry (`weights.trained`) lists what it fills from its checkpoint's metadata, any other entry
  counts as one."""
  if entry.get("format") != "trained.load" or not entry.get("checkpoint"):
    return True
  collection, _, within = f"{entry.get('into', '')}/".partition("/")
  if collection not in trained_weights.COLLECTIONS:
    return True
  filled = trained_weights.parameter_paths(entry["checkpoint"], collection=entry.get("collection", "params"),
                                           subtree=entry.get("subtree", ""))
  # the frozen regexes name paths under `params`; BatchNorm statistics sit at the same paths under `batch_stats/`.
  prefix = within if collection == "params" else f"model/{within}"
  return any(re.fullmatch(pattern, prefix + path) for pattern in frozen_patterns for path in filled)


class CachedImages:
  """A split's records with `image` replaced by the image trunk's outputs (V, ...) of that record."""

  def __init__(self, source, outputs: np.ndarray):
    if len(outputs) != len(source):
      raise ValueError(f"trunk cache holds {len(outputs)} images but the split has {len(source)}; delete the "
                       "cache directory to recompute it")
    self._source, self._outputs = source, outputs

  def __len__(self):
    return len(self._source)

  def __getitem__(self, position):
    return {**self._source[position], "image": self._outputs[position]}


class CachedTexts:
  """Tokenizer stand-in: `encode_batch` returns each caption's cached text-trunk output in place of token ids.

  Strings missing from the cache (free-text search queries) go through the trunk on demand (`compute`)."""

  def __init__(self, vocab, captions, outputs, compute):
    self._vocab, self._compute = vocab, compute
    self._rows = {caption: row for row, caption in enumerate(captions)}
    self._outputs = outputs

  @property
  def size(self):
    return self._vocab.size

  def encode_batch(self, captions, max_len):
    """(outputs (N, ...), lengths (N,) of ones, 0 truncated): the trunk already read the whole caption."""
    captions = list(captions)
    missing = sorted({c for c in captions if c not in self._rows})
    if missing:
      extra = self._compute(missing, max_len)
      self._rows.update({c: len(self._outputs) + i for i, c in enumerate(missing)})
      self._outputs = np.concatenate([self._outputs, extra]) if len(self._outputs) else extra
    rows = np.asarray([self._rows[c] for c in captions], np.int64)
    return self._outputs[rows], np.ones((len(rows),), np.int32), 0


class TrunkCache:
  """Loads or computes the cached trunk outputs of a config's frozen towers, split by split."""

  def __init__(self, config, full_model, trunk_variables_fn, vocab, *, eval_views=1):
    """full_model: the model with its trunks (`precomputed=()`); trunk_variables_fn: () -> its variables with the
    pretrained trunks (called only when something must be computed); vocab: the real tokenizer; eval_views: the
    dihedral views of each val/test image to cache (test-time augmentation)."""
    if jax.process_count() > 1:
      raise ValueError("trunk_cache.views > 0 runs in one process (the cache is computed and read locally); "
                       "set trunk_cache.views=0 for multi-process training")
    self.towers = cached_towers(config)
    lacking = sorted(set(self.towers) - set(full_model.TRUNKS))
    if lacking:
      raise ValueError(f"trunk_cache.views > 0 caches the frozen {' and '.join(lacking)} trunk(s), but model "
                       f"{config.model_name!r} splits only {full_model.TRUNKS or 'no towers'} into trunk and heads "
                       "(its TRUNKS); freeze other towers or set trunk_cache.views=0")
    self._config, self._variables_fn, self._vocab = config, trunk_variables_fn, vocab
    self._variables = None
    self._loaded = {}  # path -> its arrays
    self._views, self._eval_views = config.trunk_cache.views, eval_views
    self._dtype = np.dtype(config.trunk_cache.get("dtype", "float16"))
    if self._dtype not in (np.float16, np.float32):
      raise ValueError(f"trunk_cache.dtype={config.trunk_cache.dtype!r}: expected 'float16' or 'float32'")
    data_dir = config.dataset.get("data_dir") or sources.default_data_dir()
    self._dir = os.path.expanduser(config.trunk_cache.get("dir") or os.path.join(data_dir, "trunk_cache"))
    self._image_fn = jax.jit(lambda v, images: full_model.apply(v, images, method="image_trunk"))
    self._text_fn = jax.jit(lambda v, tokens, lengths: full_model.apply(v, tokens, lengths, method="text_trunk"))

  def variables(self):
    if self._variables is None:
      self._variables = self._variables_fn()
    return self._variables

  def images(self, split: str, source):
    """`source` with each record's image replaced by its trunk outputs: (V, ...) on the training split, one per
    evaluated view (`eval_views`) elsewhere."""
    if "image" not in self.towers:
      return source
    train = split == self._config.dataset.train_split
    views = self._views if train else self._eval_views
    path = self._path("image", split if train or views == 1 else f"{split}.{views}views")
    if not os.path.exists(path):
      self._save(path, outputs=self._compute_images(source, views, split))
    return CachedImages(source, self._load(path)["outputs"])

  def texts(self, split: str | None, source):
    """A tokenizer stand-in holding the text trunk's output of every distinct caption of `split`, whose records are
    `source` (read only to compute the cache); `split=None`: an empty one for free text, computed on demand."""
    if "text" not in self.towers:
      return self._vocab
    if split is None:
      return CachedTexts(self._vocab, [], np.zeros((0,), self._dtype), self._compute_texts)
    path = self._path("text", split)
    if not os.path.exists(path):
      distinct = sorted(set(sources.CaptionIndex.read(source).captions))
      self._save(path, outputs=self._compute_texts(distinct, self._config.text.max_len, f"{split} captions"),
                 captions=np.asarray(distinct, dtype=object))
    cached = self._load(path)
    return CachedTexts(self._vocab, cached["captions"].tolist(), cached["outputs"], self._compute_texts)

  def image_outputs(self, images: np.ndarray) -> np.ndarray:
    """Eval-preprocessed images (N, H, W, 3) -> their image-trunk outputs (N, ...) float32 (e.g. search queries)."""
    return _in_batches(lambda x: self._image_fn(self.variables(), x), (images,), self._config.eval_batch_size,
                       np.float32)

  def _load(self, path):
    """The arrays of `path`, read once: the trainer and an evaluator of the same split (a query bank drawn from the
    training split) share one copy."""
    if path not in self._loaded:
      with np.load(path, allow_pickle=True) as cached:
        self._loaded[path] = {name: cached[name] for name in cached.files}
    return self._loaded[path]

  def _path(self, tower, name):
    return os.path.join(self._dir, f"{tower}-{fingerprint(self._config, tower)}", f"{name}.npz")

  def _save(self, path, **arrays):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.partial.npz"
    np.savez(partial, **arrays)
    os.replace(partial, path)
    log("trunk cache: wrote %s (%s)", path, ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))

  def _compute_images(self, source, views, split):
    pp = preprocessing.parse(self._config.input.pp_eval)
    rows = max(1, self._config.eval_batch_size // views)
    outputs = []
    name = f"trunk cache: {split} images" + (f" ({views} views)" if views > 1 else "")
    with progress_lib.Progress(name, len(source)) as progress:
      for start in range(0, len(source), rows):
        rng = np.random.default_rng(0)  # eval preprocessing is deterministic
        images = [pp(source[i]["image"], rng) for i in range(start, min(start + rows, len(source)))]
        batch = np.stack([preprocessing.dihedral_view(image, k) for image in images for k in range(views)])
        out = _in_batches(lambda x: self._image_fn(self.variables(), x), (batch,), rows * views, self._dtype)
        outputs.append(out.reshape((len(images), views) + out.shape[1:]))
        progress.update(len(images))
    return np.concatenate(outputs)

  def _compute_texts(self, captions, max_len, what="texts"):
    tokens, lengths, _ = self._vocab.encode_batch(captions, max_len)
    with progress_lib.Progress(f"trunk cache: {what}", len(captions)) as progress:
      return _in_batches(lambda t, n: self._text_fn(self.variables(), t, n), (tokens, lengths),
                         self._config.eval_batch_size, self._dtype, progress)


def _in_batches(fn, arrays, rows, dtype, progress=None):
  """`fn` over batches of exactly `rows` rows of `arrays` (the last one padded), outputs concatenated without the
  padding, as `dtype`; counted in `progress`."""
  total = len(arrays[0])
  outputs = []
  for start in range(0, total, rows):
    batch = [a[start:start + rows] for a in arrays]
    outputs.append(np.asarray(fn(*(sharding.pad_rows(b, rows) for b in batch)))[:len(batch[0])].astype(dtype))
    if progress is not None:
      progress.update(len(batch[0]))
  return np.concatenate(outputs)
