"""HVSA: Hypersphere-based Visual Semantic Alignment (Zhang et al., TGRS 2023), as its released code does it.

Image tower: ResNet-18 layer4 features -> Key-Entity Attention (external attention over 64 learned memory slots)
-> global average pool -> Linear(512, 512). Text tower: skip-thoughts uni-skip GRU (620-d words, 2400-d state,
variational dropout 0.25) read at the last real token -> ReLU(Linear(2400, 512)). Neither embedding is
L2-normalised here: the similarity is the cosine, i.e. the dot product on the unit hypersphere. The losses
(difficulty-weighted triplet, image-only feature uniformity, learned loss weighting) live in rsalign_jax.losses.

Where the released code differs from the paper (docs/METHODS.md §2.8), this follows the code:
- text: the paper draws "word2vec + Bi-GRU + MLP"; the code is the unidirectional uni-skip GRU with last-state
  pooling and a single Linear + ReLU (so text embeddings are non-negative);
- image "MLP": a single Linear(512, 512), no activation;
- KEA's value memory starts as the transpose of its key memory and is then trained independently;
- an empty caption is encoded as the GRU state after one step on the zero padding vector.

Our options (models/towers.py): a pretrained EfficientNet-Lite trunk in place of ResNet-18 (`image_backbone`; its
1280-channel last map feeds KEA) and MiniLM/BERT in place of the GRU (`text_encoder='bert'`; the mean-pooled
sentence feeds the same ReLU(Linear) head); `frozen` towers.
"""
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rsalign_jax.similarity import cosine_similarity
from rsalign_jax.models import base
from rsalign_jax.models import layers
from rsalign_jax.models import towers


class Model(towers.SwappableTowers, base.RetrievalModel):
  """HVSA's two towers; `embed_images` and `embed_texts` run independently, `score` compares their outputs."""
  SCORE = "cosine"
  TRUNKS = ("image", "text")
  HEAD_FIELDS = ("embed_dim", "kea_slots")
  vocab_size: int
  embed_dim: int = 512
  resnet_depth: int = 18
  resnet_width: int = 64
  kea_slots: int = 64
  word_dim: int = 620
  hidden_dim: int = 2400
  text_dropout: float = 0.25
  image_backbone: str = "resnet"
  text_encoder: str = "gru"
  bert_config: Mapping[str, Any] | None = None
  frozen: tuple[str, ...] = ()
  precomputed: tuple[str, ...] = ()
  dtype: Any = jnp.float32

  def setup(self):
    self.setup_towers()
    self.kea = layers.KeyEntityAttention(self.kea_slots, self.dtype)
    self.image_fc = layers.torch_dense(self.embed_dim, fan_in=self.image_features_dim, dtype=self.dtype)
    self.text_fc = layers.torch_dense(self.embed_dim, fan_in=self.sentence_dim, dtype=self.dtype)

  def embed_images(self, images: jax.Array, *, train: bool) -> jax.Array:
    """(B, H, W, 3) normalised images -> (B, embed_dim) float32."""
    features = self.kea(self.image_features(images, train=train)["f4"], train=train)
    return self.image_fc(features.mean(axis=(1, 2))).astype(jnp.float32)

  def embed_texts(self, tokens: jax.Array, lengths: jax.Array, *, train: bool) -> jax.Array:
    """(B, T) 0-padded token ids and (B,) lengths -> (B, embed_dim) float32, non-negative."""
    sentences = self.sentence_features(tokens, lengths, train=train)
    return nn.relu(self.text_fc(sentences.astype(self.dtype))).astype(jnp.float32)

  def __call__(self, images: jax.Array, tokens: jax.Array, lengths: jax.Array, *,
               train: bool) -> dict[str, jax.Array]:
    return dict(image_embedding=self.embed_images(images, train=train),
                text_embedding=self.embed_texts(tokens, lengths, train=train))

  def score(self, image_embedding: jax.Array, text_embedding: jax.Array) -> jax.Array:
    """(N, M) cosine similarities; uses no parameters, so it runs on precomputed embeddings in any chunks."""
    return cosine_similarity(image_embedding, text_embedding)
