"""CLIP / SigLIP dual encoder: an image tower and a text tower, each followed by a bias-free linear projection.

Image towers (`image_tower`, kwargs in `image`): 'vit' (models/vit.py, CLIP's ViT), 'resnet' (models/resnet.py,
torchvision BasicBlock ResNet; global average pool of layer4) or 'efficientnet' (models/efficientnet_lite.py; its
pooled 1280-d head feature). Text towers (`text_tower`, kwargs in `text`):
'transformer' (models/text_transformer.py, CLIP's causal text Transformer) or 'bert' (models/bert.py, BERT/MiniLM).
`text_pool` picks the sentence state: 'argmax' (CLIP checkpoints: the end-of-text token has the highest id) or
'last' (position lengths-1) for the transformer; 'mean' or 'cls' for BERT. `projection_hidden` > 0 replaces each
linear projection by an MLP (`MlpProjection`: that hidden width, GELU, `projection_dropout`); `image_pool` pools a
ResNet / EfficientNet map by its average (the usual) or its average and max concatenated ('mean_max').
Embeddings are returned unnormalised in float32; the score (and the losses) use the cosine, as CLIP's L2
normalisation does. Towers named in `frozen` ('image', 'text') run in inference mode under `stop_gradient` (the
optimizer's `frozen` patterns keep their parameters fixed), e.g. the linear-probe floor: pretrained towers frozen,
only the projections trained. `image_trunk` (a ResNet / EfficientNet map before pooling, a ViT's pooled output) and
`text_trunk` (the pooled sentence) are the towers' outputs before the heads; a tower named in `precomputed` reads
them as its input instead of images / token ids (frozen trunks computed once, `rsalign_jax.trunk_cache`).

Parameter names: `image_encoder`, `text_encoder`, `image_projection/kernel` (OpenCLIP `visual.proj`),
`text_projection/kernel` (OpenCLIP `text_projection`), so rsalign_jax.weights.clip maps CLIP checkpoints one to one.
"""
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from rsalign_jax.similarity import cosine_similarity
from rsalign_jax.models import base, bert, efficientnet_lite, resnet, text_transformer, vit

IMAGE_TOWERS = ("vit", "resnet", "efficientnet")
TEXT_TOWERS = ("transformer", "bert")
TEXT_POOLS = {"transformer": ("argmax", "last"), "bert": ("mean", "cls")}
IMAGE_POOLS = ("mean", "mean_max")


def pool_map(maps: jax.Array, pool: str) -> jax.Array:
  """(B, h, w, C) -> (B, C) global average ('mean'), or (B, 2C) average and max concatenated ('mean_max')."""
  mean = maps.mean(axis=(1, 2))
  return mean if pool == "mean" else jnp.concatenate([mean, maps.max(axis=(1, 2))], axis=-1)


class Model(base.RetrievalModel):
  """Two towers + projections; `embed_images` and `embed_texts` run independently, `score` is the cosine."""
  SCORE = "cosine"
  TRUNKS = ("image", "text")
  HEAD_FIELDS = ("embed_dim", "image_pool", "projection_hidden", "projection_dropout")
  vocab_size: int
  embed_dim: int = 256
  image_tower: str = "vit"
  image: Mapping[str, Any] | None = None
  text_tower: str = "transformer"
  text: Mapping[str, Any] | None = None
  text_pool: str = "last"
  frozen: tuple[str, ...] = ()
  precomputed: tuple[str, ...] = ()
  image_pool: str = "mean"
  projection_hidden: int = 0
  projection_dropout: float = 0.0
  dtype: Any = jnp.float32

  def __post_init__(self):
    # Tower kwargs arrive as dicts (config.model.to_dict()); frozen, the module stays hashable (jit caches key on it).
    object.__setattr__(self, "image", flax.core.FrozenDict(self.image or {}))
    object.__setattr__(self, "text", flax.core.FrozenDict(self.text or {}))
    object.__setattr__(self, "frozen", tuple(self.frozen))
    object.__setattr__(self, "precomputed", tuple(self.precomputed))
    super().__post_init__()

  def setup(self):
    if self.image_tower not in IMAGE_TOWERS:
      raise ValueError(f"model.image_tower={self.image_tower!r}: expected one of {IMAGE_TOWERS}")
    if self.text_tower not in TEXT_TOWERS:
      raise ValueError(f"model.text_tower={self.text_tower!r}: expected one of {TEXT_TOWERS}")
    if self.text_pool not in TEXT_POOLS[self.text_tower]:
      raise ValueError(f"model.text_pool={self.text_pool!r}: the {self.text_tower!r} tower pools with one of "
                       f"{TEXT_POOLS[self.text_tower]}")
    if set(self.frozen) - {"image", "text"}:
      raise ValueError(f"model.frozen={self.frozen!r}: expected towers among ('image', 'text')")
    if self.image_pool not in IMAGE_POOLS:
      raise ValueError(f"model.image_pool={self.image_pool!r}: expected one of {IMAGE_POOLS}")
    if set(self.precomputed) - set(self.frozen):
      raise ValueError(f"model.precomputed={self.precomputed!r}: only frozen towers {self.frozen!r} can be "
                       "precomputed (a trained tower's output changes every step)")
    image, text = dict(self.image or {}), dict(self.text or {})
    if self.image_tower == "vit":
      self.image_encoder = vit.ViT(**image, dtype=self.dtype)
    elif self.image_tower == "resnet":
      self.image_encoder = resnet.ResNet(**image, dtype=self.dtype)
    else:
      self.image_encoder = efficientnet_lite.EfficientNetLite(**image, dtype=self.dtype)
    if self.text_tower == "transformer":
      self.text_encoder = text_transformer.TextTransformer(self.vocab_size, **text, dtype=self.dtype)
    else:
      self.text_encoder = bert.Bert(vocab_size=self.vocab_size, **text, dtype=self.dtype)
    if self.projection_hidden:
      self.image_projection = MlpProjection(self.projection_hidden, self.embed_dim, self.projection_dropout,
                                            self.dtype)
      self.text_projection = MlpProjection(self.projection_hidden, self.embed_dim, self.projection_dropout,
                                           self.dtype)
    else:
      self.image_projection = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype,
                                       kernel_init=nn.initializers.xavier_uniform())
      self.text_projection = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype,
                                      kernel_init=nn.initializers.xavier_uniform())

  def image_trunk(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """(B, H, W, 3) normalised images -> the tower's output before pooling and projection: the last feature map
    (B, h, w, C) of a ResNet / EfficientNet, the pooled (B, width) of a ViT."""
    frozen = "image" in self.frozen
    features = self.image_encoder(images, train=train and not frozen)
    if self.image_tower in ("resnet", "efficientnet"):
      features = features["f4"]
    return jax.lax.stop_gradient(features) if frozen else features

  def text_trunk(self, tokens: jax.Array, lengths: jax.Array, *, train: bool = False) -> jax.Array:
    """(B, T) token ids and (B,) lengths -> (B, features) pooled tower output, before the projection."""
    frozen = "text" in self.frozen
    train = train and not frozen
    if self.text_tower == "transformer":
      hidden = self.text_encoder(tokens, train=train)
      pooled = text_transformer.pool_tokens(hidden, tokens, lengths, self.text_pool)
    else:
      hidden = self.text_encoder(tokens, lengths, train=train)
      pooled = bert.mean_pool(hidden, lengths) if self.text_pool == "mean" else bert.cls_pool(hidden)
    return jax.lax.stop_gradient(pooled) if frozen else pooled

  def embed_images(self, images: jax.Array, *, train: bool) -> jax.Array:
    """(B, H, W, 3) normalised images (or `image_trunk` outputs if precomputed) -> (B, embed_dim) float32."""
    features = images if "image" in self.precomputed else self.image_trunk(images, train=train)
    if features.ndim == 4:
      features = pool_map(features.astype(jnp.float32), self.image_pool)
    return self._project(self.image_projection, features, train)

  def embed_texts(self, tokens: jax.Array, lengths: jax.Array, *, train: bool) -> jax.Array:
    """(B, T) token ids and (B,) lengths (or `text_trunk` outputs if precomputed) -> (B, embed_dim) float32."""
    pooled = tokens if "text" in self.precomputed else self.text_trunk(tokens, lengths, train=train)
    return self._project(self.text_projection, pooled, train)

  def _project(self, projection, features, train):
    features = features.astype(self.dtype)
    outputs = projection(features, train=train) if self.projection_hidden else projection(features)
    return outputs.astype(jnp.float32)

  def __call__(self, images: jax.Array, tokens: jax.Array, lengths: jax.Array, *,
               train: bool) -> dict[str, jax.Array]:
    return dict(image_embedding=self.embed_images(images, train=train),
                text_embedding=self.embed_texts(tokens, lengths, train=train))

  def score(self, image_embedding: jax.Array, text_embedding: jax.Array) -> jax.Array:
    """(N, M) cosine similarities; uses no parameters, so it runs on precomputed embeddings in any chunks."""
    return cosine_similarity(image_embedding, text_embedding)


class MlpProjection(nn.Module):
  """Dense(hidden) -> GELU -> dropout -> Dense(out): a two-layer projection head (SimCLR's, CLIP-Adapter's shape),
  the usual step up from a linear probe on frozen features."""
  hidden: int
  out: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(x))
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return nn.Dense(self.out, dtype=self.dtype, name="out")(x)
