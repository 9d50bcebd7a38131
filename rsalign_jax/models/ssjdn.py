"""SSJDN: Scale-Semantic Joint Decoupling Network (Zheng et al., arXiv 2212.05752 / ACM TOMM 2024), our design.

Only the abstract is public (docs/METHODS.md Part B §3.1: bidirectional scale decoupling with SFE and SGS units,
label-supervised semantic decoupling, a semantic-guided triplet loss). Everything concrete below is OUR design,
following docs/METHODS.md Part B §3.2; the paper's own layers, sizes and formulas are unknown.

Image tower (ours):
- backbone: ResNet-18 stages f2, f3, f4 (strides 8/16/32), each projected to `scale_dim` by a linear 1x1 conv (no
  BN or ReLU). docs/METHODS.md Part B §3.2.1 names ResNet-50; `rsalign_jax.models.resnet` has the BasicBlock ResNets
  only (18/34, no bottleneck blocks), and a ResNet-18 is what AMFMN, the family SSJDN compares with, uses and what fits
  the 2-core CPU default;
- SFE (salience feature extraction): a CBAM-style spatial saliency map M = sigmoid(conv7x7([mean_c F; max_c F]))
  (one output channel, with bias, no BN, no channel attention), salient descriptor GAP(M * F);
- SGS (salience-guided suppression): F' = F * (1 - gamma * Resize(M)) where M is the saliency map of the previous
  scale of the chain, Resize is bilinear with half-pixel centres and no antialiasing (PyTorch's
  `interpolate(..., align_corners=False)`), and gamma = sigmoid(a) with a learned scalar a = 0 at init (gamma 0.5);
- bidirectional chains: top-down SFE(F4) -> SGS on F3 -> SFE -> SGS on F2 -> SFE, bottom-up the mirror image; each
  unit (6 SFE, 4 SGS) has its own parameters; per-scale f_s = f_s(down) + f_s(up); v = norm(W [f2; f3; f4]).
Text tower (ours): word embedding (dropout on the word vectors) -> bidirectional GRU, the two directions' outputs
averaged (so each position's output has read the whole caption) and mean-pooled over the real tokens (no position
privileged, unlike last-state pooling, which for the backward direction would be the first word), then a linear
map to the joint space and L2 normalisation.
LSD (label-supervised semantic decoupling, ours): C class prototypes P (C, D), shared by both towers and initialised
at random (N(0, 1/D), rows of norm ~1) since no word vectors of the class names are available offline;
logits = x P^T / tau for a unit embedding x, x_sem = softmax(logits) P, final embedding x + x_sem. The same logits
are the class logits that the objective supervises with the scene label (rsalign_jax.losses.ssjdn), so the label
supervision shapes exactly the attention that picks the prototypes.
Scores are cosines of the final embeddings.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rsalign_jax.similarity import cosine_similarity, l2_normalize
from rsalign_jax.models import base
from rsalign_jax.models import layers
from rsalign_jax.models import resnet

SCALES = ("f2", "f3", "f4")  # fine to coarse


def resize_bilinear(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
  """(B, h, w, C) -> (B, H, W, C) bilinear, half-pixel centres, no antialiasing (torch align_corners=False)."""
  return jax.image.resize(maps, maps.shape[:1] + tuple(size) + maps.shape[3:], "linear", antialias=False)


class SalienceFeatureExtraction(nn.Module):
  """SFE: saliency M = sigmoid(conv7x7([mean_c F; max_c F])) (B, H, W, 1) float32 and descriptor GAP(M * F)."""
  kernel_size: int = 7
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> tuple[jax.Array, jax.Array]:
    pooled = jnp.concatenate([features.mean(-1, keepdims=True), features.max(-1, keepdims=True)], axis=-1)
    k, pad = self.kernel_size, self.kernel_size // 2
    logits = nn.Conv(1, (k, k), padding=((pad, pad), (pad, pad)), kernel_init=layers.torch_kernel_init,
                     bias_init=layers.torch_bias_init(2 * k * k), dtype=self.dtype, name="conv")(pooled)
    saliency = jax.nn.sigmoid(logits.astype(jnp.float32))
    return saliency, jnp.mean(saliency * features.astype(jnp.float32), axis=(1, 2))


class SalienceGuidedSuppression(nn.Module):
  """SGS: F * (1 - gamma Resize(M)), gamma = sigmoid(learned scalar) in [0, 1], 0.5 at init."""

  @nn.compact
  def __call__(self, features: jax.Array, saliency: jax.Array) -> jax.Array:
    gamma = jax.nn.sigmoid(self.param("gamma_logit", nn.initializers.zeros, ()))
    keep = 1.0 - gamma * resize_bilinear(saliency, features.shape[1:3])
    return features * keep.astype(features.dtype)


class BidirectionalScaleDecoupling(nn.Module):
  """BSD over {'f2', 'f3', 'f4'} maps of equal channels: the per-scale descriptors f_s = f_s(down) + f_s(up)."""
  dtype: Any = jnp.float32

  def chain(self, features: dict[str, jax.Array], order: tuple[str, ...], direction: str) -> dict[str, jax.Array]:
    descriptors, saliency = {}, None
    for scale in order:
      x = features[scale]
      if saliency is not None:
        x = SalienceGuidedSuppression(name=f"sgs_{direction}_{scale}")(x, saliency)
      saliency, descriptors[scale] = SalienceFeatureExtraction(dtype=self.dtype, name=f"sfe_{direction}_{scale}")(x)
    return descriptors

  @nn.compact
  def __call__(self, features: dict[str, jax.Array]) -> dict[str, jax.Array]:
    down = self.chain(features, SCALES[::-1], "down")
    up = self.chain(features, SCALES, "up")
    return {scale: down[scale] + up[scale] for scale in SCALES}


def _average(a: jax.Array, b: jax.Array) -> jax.Array:
  return (a + b) / 2


class BiGRUEncoder(nn.Module):
  """Word embedding -> BiGRU (directions averaged) -> mean over the first max(length, 1) positions, (B, hidden)."""
  vocab_size: int
  word_dim: int = 300
  hidden_dim: int = 512
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, lengths: jax.Array, *, train: bool) -> jax.Array:
    words = nn.Embed(self.vocab_size, self.word_dim, name="embedding")(tokens) * (tokens != 0)[..., None]
    words = nn.Dropout(self.dropout, deterministic=not train)(words)
    lengths = jnp.maximum(lengths, 1)
    forward = nn.RNN(nn.GRUCell(self.hidden_dim, dtype=self.dtype, name="forward_gru"))
    backward = nn.RNN(nn.GRUCell(self.hidden_dim, dtype=self.dtype, name="backward_gru"), reverse=True,
                      keep_order=True)
    outputs = nn.Bidirectional(forward, backward, merge_fn=_average)(words.astype(self.dtype), seq_lengths=lengths)
    real = (jnp.arange(tokens.shape[1])[None, :] < lengths[:, None])[..., None]
    return jnp.sum(jnp.where(real, outputs.astype(jnp.float32), 0.0), axis=1) / lengths[:, None]


class LabelSemanticDecoupling(nn.Module):
  """LSD: for unit x (B, D), logits = x P^T / tau and x + softmax(logits) P, with C learned prototypes P (C, D)."""
  num_classes: int
  temperature: float = 0.1

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    dim = x.shape[-1]
    prototypes = self.param("prototypes", nn.initializers.normal(stddev=dim**-0.5), (self.num_classes, dim))
    logits = jnp.matmul(x, prototypes.T, precision=jax.lax.Precision.HIGHEST) / self.temperature
    semantic = jnp.matmul(jax.nn.softmax(logits, axis=-1), prototypes, precision=jax.lax.Precision.HIGHEST)
    return x + semantic, logits


class Model(base.RetrievalModel):
  """SSJDN's two towers with shared class prototypes; `__call__` adds the class logits the objective needs."""
  SCORE = "cosine"
  vocab_size: int
  num_classes: int = 21
  embed_dim: int = 512
  scale_dim: int = 512
  resnet_depth: int = 18
  resnet_width: int = 64
  word_dim: int = 300
  hidden_dim: int = 512
  text_dropout: float = 0.0
  temperature: float = 0.1
  dtype: Any = jnp.float32

  def setup(self):
    if self.num_classes < 1:
      raise ValueError(f"ssjdn model.num_classes={self.num_classes}: expected the dataset's number of scene classes")
    self.resnet = resnet.ResNet(self.resnet_depth, self.resnet_width, self.dtype)
    self.projections = {scale: layers.torch_dense(self.scale_dim, fan_in=self.resnet.width * 2**s, dtype=self.dtype)
                        for s, scale in enumerate(SCALES, start=1)}
    self.bsd = BidirectionalScaleDecoupling(self.dtype)
    self.image_fc = layers.torch_dense(self.embed_dim, fan_in=len(SCALES) * self.scale_dim)
    self.text_encoder = BiGRUEncoder(self.vocab_size, self.word_dim, self.hidden_dim, self.text_dropout, self.dtype)
    self.text_fc = layers.torch_dense(self.embed_dim, fan_in=self.hidden_dim)
    self.lsd = LabelSemanticDecoupling(self.num_classes, self.temperature)

  def image_features(self, images: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
    """(final embedding, class logits), both float32."""
    stages = self.resnet(images, train=train)
    descriptors = self.bsd({scale: self.projections[scale](stages[scale]) for scale in SCALES})
    v = self.image_fc(jnp.concatenate([descriptors[scale] for scale in SCALES], axis=-1))
    return self.lsd(l2_normalize(v.astype(jnp.float32)))

  def text_features(self, tokens: jax.Array, lengths: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
    """(final embedding, class logits), both float32."""
    t = self.text_fc(self.text_encoder(tokens, lengths, train=train))
    return self.lsd(l2_normalize(t.astype(jnp.float32)))

  def embed_images(self, images: jax.Array, *, train: bool) -> jax.Array:
    """(B, H, W, 3) normalised images -> (B, embed_dim) float32 (v + v_sem)."""
    return self.image_features(images, train=train)[0]

  def embed_texts(self, tokens: jax.Array, lengths: jax.Array, *, train: bool) -> jax.Array:
    """(B, T) 0-padded token ids and (B,) lengths -> (B, embed_dim) float32 (t + t_sem)."""
    return self.text_features(tokens, lengths, train=train)[0]

  def __call__(self, images: jax.Array, tokens: jax.Array, lengths: jax.Array, *,
               train: bool) -> dict[str, jax.Array]:
    image_embedding, image_logits = self.image_features(images, train=train)
    text_embedding, text_logits = self.text_features(tokens, lengths, train=train)
    return dict(image_embedding=image_embedding, text_embedding=text_embedding, image_logits=image_logits,
                text_logits=text_logits)

  def score(self, image_embedding: jax.Array, text_embedding: jax.Array) -> jax.Array:
    """(N, M) cosine similarities; uses no parameters, so it runs on precomputed embeddings in any chunks."""
    return cosine_similarity(image_embedding, text_embedding)
