"""CCLS2T: cross-modal contrastive learning with spatiotemporal context (Zhu et al., TGRS 2024), our design.

Only a truncated abstract is public (docs/METHODS.md Part B §4.1): an asymmetric dual encoder, a multiscale vision
encoder and a lightweight text encoder that reconstructs spatiotemporal embeddings, cross-modal and intermediate
contrastive objectives, hash codes and a hierarchical index for content-based RS image retrieval. Everything
concrete below is our design (docs/METHODS.md Part B §4.2):

- Image tower: the image and 2x, 4x, ... average-pooled copies (`scales`) through ONE shared ResNet trunk. A copy
  downsampled by f stops at stage 4 - log2(f), whose stride (32 / f in its pixels) covers the same 32x32 patch of
  the original image as the full-resolution stage 4: the token grids align, and the coarse copy never reaches
  XLA:CPU's pathologically slow 3x3 convs on 2x2 maps (at 80 px a 40 px copy's stage 4 is 2x2 and costs 4x its
  stages 1-3). Each scale's tokens are projected to the stage-4 width, get a learned scale embedding, and are
  fused by multi-head attention pooling (one learned query) -> Linear -> the embedding. Mid-level features: the
  full-resolution stage 3, average-pooled -> Linear. The shared stages' batch norms see both scales in training
  (each call updates the running statistics in turn).
- Text tower: a pre-LN transformer over [CLS] + word tokens (learned positions, padding masked). The `spacetime`
  field (Fourier features of lat/lon, day of year, year, log-GSD; `rsalign_jax.data.fields.spacetime`) goes
  through an MLP and is added to the CLS token. The final CLS -> LayerNorm -> Linear is the embedding; the CLS
  after layer depth // 2 -> LayerNorm -> Linear is the mid-level feature; an MLP head regresses the spacetime
  features from the final CLS ("reconstructs spatiotemporal embeddings").
- Hash layers: h = tanh(W z) per modality on the embedding z, `hash_bits` bits; codes are sign(h).
- Without metadata (`spacetime=False`, e.g. RSICD captions) the text tower takes no field and reconstructs nothing.
Embeddings are returned unnormalised; `score` is their cosine (what the float evaluators and losses use).
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rsalign_jax.similarity import cosine_similarity
from rsalign_jax.models import base
from rsalign_jax.models import resnet


class AttentionPool(nn.Module):
  """Multi-head attention of one learned query over (B, N, C) tokens -> (B, C)."""
  heads: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    width = tokens.shape[-1]
    query = self.param("query", nn.initializers.normal(0.02), (1, 1, width))
    query = jnp.broadcast_to(query.astype(self.dtype), (tokens.shape[0], 1, width))
    tokens = nn.LayerNorm(dtype=self.dtype, name="norm")(tokens)
    pooled = nn.MultiHeadDotProductAttention(self.heads, dtype=self.dtype, name="attention")(query, tokens)
    return pooled[:, 0]


class MultiscaleImageEncoder(nn.Module):
  """Shared trunk over the image and its downsampled copies, scale-aligned tokens fused by attention pooling."""
  embed_dim: int
  resnet_depth: int = 18
  resnet_width: int = 64
  scales: tuple = (1, 2)
  heads: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
    """(B, H, W, 3) -> (embedding (B, embed_dim), mid-level feature (B, embed_dim))."""
    if self.scales[0] != 1 or any(f < 1 or f & (f - 1) or f > 8 for f in self.scales):
      raise ValueError(f"model.scales={self.scales}: expected 1 first, then powers of two up to 8")
    trunk = resnet.ResNet(self.resnet_depth, self.resnet_width, self.dtype, name="resnet")
    width = trunk.out_features
    tokens, mid = [], None
    for i, factor in enumerate(self.scales):
      copy = images if factor == 1 else nn.avg_pool(images, (factor, factor), strides=(factor, factor))
      stage = 4 - int(math.log2(factor))
      features = trunk(copy.astype(self.dtype), train=train, last_stage=stage)
      if factor == 1:
        mid = features["f3"].mean(axis=(1, 2))
      grid = features[f"f{stage}"]
      grid = grid.reshape(grid.shape[0], -1, grid.shape[-1])
      if grid.shape[-1] != width:
        grid = nn.Dense(width, dtype=self.dtype, name=f"scale{i}_proj")(grid)
      embedding = self.param(f"scale{i}_embedding", nn.initializers.normal(0.02), (width,))
      tokens.append(grid + embedding.astype(self.dtype))
    pooled = AttentionPool(self.heads, self.dtype, name="pool")(jnp.concatenate(tokens, axis=1))
    embedding = nn.Dense(self.embed_dim, dtype=self.dtype, name="proj")(pooled)
    return embedding, nn.Dense(self.embed_dim, dtype=self.dtype, name="mid_proj")(mid)


class TransformerBlock(nn.Module):
  """Pre-LN block: x + MHA(LN x), then x + MLP(LN x)."""
  heads: int
  mlp_ratio: int = 4
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(self.heads, dropout_rate=self.dropout, dtype=self.dtype)(
        y, y, mask=mask, deterministic=not train)
    x = x + nn.Dropout(self.dropout)(y, deterministic=not train)
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.gelu(nn.Dense(self.mlp_ratio * x.shape[-1], dtype=self.dtype)(y))
    y = nn.Dense(x.shape[-1], dtype=self.dtype)(y)
    return x + nn.Dropout(self.dropout)(y, deterministic=not train)


class SpacetimeTextEncoder(nn.Module):
  """[CLS] + tokens through a small transformer; spacetime features (optional) added to CLS through an MLP."""
  vocab_size: int
  embed_dim: int
  width: int = 256
  depth: int = 2
  heads: int = 4
  max_len: int = 64
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, lengths: jax.Array, spacetime: jax.Array | None, *,
               train: bool) -> dict[str, jax.Array]:
    """-> {embedding, mid: (B, embed_dim), cls: (B, width) final CLS state after LayerNorm}."""
    batch, length = tokens.shape
    if length + 1 > self.max_len:
      raise ValueError(f"text.max_len={length} exceeds the text tower's {self.max_len - 1} positions "
                       "(model.max_text_len)")
    words = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02), dtype=self.dtype,
                     name="embed")(tokens)
    cls = jnp.broadcast_to(self.param("cls", nn.initializers.normal(0.02), (1, 1, self.width)),
                           (batch, 1, self.width)).astype(self.dtype)
    if spacetime is not None:
      context = nn.gelu(nn.Dense(self.width, dtype=self.dtype, name="spacetime_in")(spacetime.astype(self.dtype)))
      cls = cls + nn.Dense(self.width, dtype=self.dtype, name="spacetime_out")(context)[:, None]
    positions = self.param("positions", nn.initializers.normal(0.02), (self.max_len, self.width))
    x = jnp.concatenate([cls, words], axis=1) + positions[:length + 1].astype(self.dtype)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    valid = jnp.arange(length + 1)[None, :] <= lengths[:, None]  # CLS + the real tokens
    mask = nn.make_attention_mask(valid, valid)
    mid_layer = max(1, self.depth // 2)
    mid = None
    for layer in range(self.depth):
      x = TransformerBlock(self.heads, dropout=self.dropout, dtype=self.dtype, name=f"block{layer}")(
          x, mask, train=train)
      if layer + 1 == mid_layer:
        mid = nn.LayerNorm(dtype=self.dtype, name="mid_norm")(x[:, 0])
    cls_state = nn.LayerNorm(dtype=self.dtype, name="final_norm")(x[:, 0])
    return dict(embedding=nn.Dense(self.embed_dim, dtype=self.dtype, name="proj")(cls_state),
                mid=nn.Dense(self.embed_dim, dtype=self.dtype, name="mid_proj")(mid), cls=cls_state)


class Model(base.RetrievalModel):
  """CCLS2T's asymmetric dual encoder with hash heads; see the module docstring."""
  vocab_size: int
  embed_dim: int = 256
  resnet_depth: int = 18
  resnet_width: int = 32
  scales: tuple = (1, 2)
  fusion_heads: int = 4
  text_width: int = 256
  text_depth: int = 2
  text_heads: int = 4
  max_text_len: int = 64
  text_dropout: float = 0.1
  hash_bits: int = 64
  spacetime: bool = True
  spacetime_dim: int = 0  # the width of the 'spacetime' field (rsalign_jax.data.fields.SPACETIME_DIM)
  dtype: Any = jnp.float32

  SCORE = "cosine"
  HASH_CODES = True

  @property
  def TEXT_FIELDS(self):  # pylint: disable=invalid-name  (the contract's declaration; a config field decides it)
    return ("spacetime",) if self.spacetime else ()

  def setup(self):
    if self.spacetime and self.spacetime_dim < 1:
      raise ValueError("model.spacetime=True needs model.spacetime_dim (the 'spacetime' field's width, "
                       f"rsalign_jax.data.fields.SPACETIME_DIM); got {self.spacetime_dim}")
    self.image_encoder = MultiscaleImageEncoder(self.embed_dim, self.resnet_depth, self.resnet_width,
                                                tuple(self.scales), self.fusion_heads, self.dtype)
    self.text_encoder = SpacetimeTextEncoder(self.vocab_size, self.embed_dim, self.text_width, self.text_depth,
                                             self.text_heads, self.max_text_len, self.text_dropout, self.dtype)
    self.image_hash = nn.Dense(self.hash_bits, dtype=self.dtype)
    self.text_hash = nn.Dense(self.hash_bits, dtype=self.dtype)
    if self.spacetime:
      self.spacetime_hidden = nn.Dense(self.text_width, dtype=self.dtype)
      self.spacetime_head = nn.Dense(self.spacetime_dim, dtype=self.dtype)

  def _spacetime(self, spacetime):
    if self.spacetime and spacetime is None:
      raise ValueError("the CCLS2T text tower needs the 'spacetime' field (model.spacetime=True)")
    return spacetime if self.spacetime else None

  def encode_images(self, images: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """-> {embedding, mid: (B, embed_dim), codes: (B, hash_bits) relaxed codes in (-1, 1)}, float32."""
    embedding, mid = self.image_encoder(images, train=train)
    codes = jnp.tanh(self.image_hash(embedding))
    return jax.tree.map(lambda x: x.astype(jnp.float32), dict(embedding=embedding, mid=mid, codes=codes))

  def encode_texts(self, tokens: jax.Array, lengths: jax.Array, *, spacetime: jax.Array | None = None,
                   train: bool) -> dict[str, jax.Array]:
    """-> {embedding, mid, codes, and `spacetime` (the reconstruction, (B, 20)) when the model uses metadata}."""
    out = self.text_encoder(tokens, lengths, self._spacetime(spacetime), train=train)
    result = dict(embedding=out["embedding"], mid=out["mid"], codes=jnp.tanh(self.text_hash(out["embedding"])))
    if self.spacetime:
      result["spacetime"] = self.spacetime_head(nn.gelu(self.spacetime_hidden(out["cls"])))
    return jax.tree.map(lambda x: x.astype(jnp.float32), result)

  def embed_images(self, images: jax.Array, *, train: bool) -> jax.Array:
    return self.encode_images(images, train=train)["embedding"]

  def embed_texts(self, tokens: jax.Array, lengths: jax.Array, *, spacetime: jax.Array | None = None,
                  train: bool) -> jax.Array:
    return self.encode_texts(tokens, lengths, spacetime=spacetime, train=train)["embedding"]

  def image_codes(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """(B, hash_bits) relaxed codes h; `rsalign_jax.losses.hashing.binary_codes` gives sign(h)."""
    return self.encode_images(images, train=train)["codes"]

  def text_codes(self, tokens: jax.Array, lengths: jax.Array, *, spacetime: jax.Array | None = None,
                 train: bool = False) -> jax.Array:
    return self.encode_texts(tokens, lengths, spacetime=spacetime, train=train)["codes"]

  def __call__(self, images: jax.Array, tokens: jax.Array, lengths: jax.Array, *,
               spacetime: jax.Array | None = None, train: bool) -> dict[str, jax.Array]:
    image, text = self.encode_images(images, train=train), self.encode_texts(tokens, lengths, spacetime=spacetime,
                                                                               train=train)
    outputs = dict(image_embedding=image["embedding"], text_embedding=text["embedding"], image_mid=image["mid"],
                   text_mid=text["mid"], image_codes=image["codes"], text_codes=text["codes"])
    if self.spacetime:
      outputs["spacetime_reconstruction"] = text["spacetime"]
    return outputs

  def score(self, image_embedding: jax.Array, text_embedding: jax.Array) -> jax.Array:
    """(N, M) cosine similarities of float embeddings (parameter-free, so any chunking works)."""
    return cosine_similarity(image_embedding, text_embedding)
