"""The contract between a method's model and the trainer, the evaluators and serving.

A method is `rsalign_jax/models/<name>.py` defining `Model(RetrievalModel)`, `rsalign_jax/losses/<name>.py` defining
`Objective(losses.base.Objective)`, and a config naming both (`model_name`, `loss_name`). Every Model provides

  embed_images(images, *, train, **image_fields) -> the images' embeddings, what `score` reads (float32)
  embed_texts(tokens, lengths, *, train, **text_fields) -> the captions' embeddings (float32)
  score(image_embedding, text_embedding) -> (N, M) float32 retrieval scores of N images against M captions
  __call__(images, tokens, lengths, *, train, **fields) -> the dict of outputs its objective reads

and declares, as class attributes (or properties, where a config field decides):

  IMAGE_FIELDS, TEXT_FIELDS  per-image dataset fields (rsalign_jax.data.fields) the image / text tower takes as
                             keywords; every batch, evaluation split and export carries them
  PAIRWISE                   __call__'s outputs couple the examples of a batch (a (B, B) score matrix); gradient
                             caching, which embeds a batch chunk by chunk, refuses such models
  SCORE                      'cosine': `score` is the cosine of the two embeddings, so L2-normalised embeddings
                             compared by inner product (any vector index) rank as the model does (exports are
                             normalised); 'model': `score` needs the model (a learned or pairwise score)

Optional capabilities, declared rather than probed:

  TRUNKS       towers split into a trunk that can be frozen and cached ('image' -> `image_trunk(images)`,
               'text' -> `text_trunk(tokens, lengths)`) and heads; such a model takes `precomputed`, the towers
               whose inputs are the trunk outputs (rsalign_jax.trunk_cache)
  HEAD_FIELDS  model config fields only the heads read (they do not change the cached trunk outputs)
  HASH_CODES   `image_codes(images)` / `text_codes(tokens, lengths, **text_fields)`: relaxed binary codes
"""
from typing import ClassVar

import flax.linen as nn

from rsalign_jax import registry

TOWER_NAMES = ("image", "text")
SCORES = ("cosine", "model")


class RetrievalModel(nn.Module):
  """Base of every method's `Model`: the declarations above with their defaults, checked when a subclass is made."""
  IMAGE_FIELDS: ClassVar[tuple[str, ...]] = ()
  TEXT_FIELDS: ClassVar[tuple[str, ...]] = ()
  PAIRWISE: ClassVar[bool] = False
  SCORE: ClassVar[str] = "model"
  TRUNKS: ClassVar[tuple[str, ...]] = ()
  HEAD_FIELDS: ClassVar[tuple[str, ...]] = ()
  HASH_CODES: ClassVar[bool] = False

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    required = ["embed_images", "embed_texts", "score", "__call__"]
    required += [f"{tower}_trunk" for tower in cls.TRUNKS]
    required += ["image_codes", "text_codes"] if cls.HASH_CODES else []
    missing = [name for name in required if getattr(cls, name, None) is getattr(RetrievalModel, name, None)]
    unknown = sorted(set(cls.TRUNKS) - set(TOWER_NAMES))
    if unknown:
      raise TypeError(f"{cls.__module__}.{cls.__qualname__}.TRUNKS: {unknown} not in {TOWER_NAMES}")
    if cls.SCORE not in SCORES:
      raise TypeError(f"{cls.__module__}.{cls.__qualname__}.SCORE={cls.SCORE!r}: expected one of {SCORES}")
    if missing:
      raise TypeError(f"{cls.__module__}.{cls.__qualname__} does not define {missing}, which RetrievalModel's "
                      "contract and its declarations require (rsalign_jax/models/base.py)")

  def embed_images(self, images, *, train, **image_fields):
    raise NotImplementedError

  def embed_texts(self, tokens, lengths, *, train, **text_fields):
    raise NotImplementedError

  def score(self, image_embedding, text_embedding):
    raise NotImplementedError

  def __call__(self, images, tokens, lengths, *, train, **fields):
    raise NotImplementedError


def model_class(name: str) -> type[RetrievalModel]:
  """`rsalign_jax.models.<name>.Model`, checked to keep the contract."""
  return registry.find_class("rsalign_jax.models", name, "Model", field="model_name",
                             is_valid=lambda cls: issubclass(cls, RetrievalModel),
                             expected="subclassing rsalign_jax.models.base.RetrievalModel")


def fields(model: RetrievalModel) -> tuple[str, ...]:
  """The per-image fields a model's towers take: its IMAGE_FIELDS, then its TEXT_FIELDS."""
  return tuple(model.IMAGE_FIELDS) + tuple(model.TEXT_FIELDS)
