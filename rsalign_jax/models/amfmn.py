"""AMFMN: Asymmetric Multimodal Feature Matching Network (Yuan et al., TGRS 2021), as its released code does it.

Image tower (docs/METHODS.md §3.1): ResNet-18 stages f1..f4; low level L = [f1, up(f2)], high level H = [f3, up(f4)];
MVSA: L' = Conv3x3/4(L) and H' = Conv1x1(H) to c = 3 channels each, J = [L', H'] + mean_c(H'), a spatial map
a = Conv1x1(J) * sigmoid(Conv1x1(J)) flattened, and the image vector F_v = g * sigmoid(Linear(a)) where
g = Linear(mean pooled f4). Text tower (docs/METHODS.md §3.2): the skip-thoughts uni-skip GRU -> ReLU(Linear).
Visual-guided attention (docs/METHODS.md §3.3) re-weights caption j by image i and the score is
S_ij = cos(F_v_i, Ft_ij):
  soft_att        Ft_ij = sigmoid(W v_i + b) * t_j  (the released configs' choice),
  fusion_att      Ft_ij = sigmoid(W1 [v_i; t_j] + b1) * (W2 [v_i; t_j] + b2),
  similarity_att  Ft_ij = sigmoid(v'_i * t'_j) * t'_j,  v' = W_v v + b_v, t' = W_t t + b_t.
The text embedding thus depends on the image, so `embed_images`/`embed_texts` return the towers' outputs (F_v, t)
and `score` (which owns the attention parameters) does the rest. soft_att has an exact closed form with gate
g_i = sigmoid(W v_i + b): S_ij = [(v_i g_i) . t_j] / max(||v_i|| sqrt((g_i^2) . (t_j^2)), 1e-8), two matmuls.
The other two are pairwise: they run over blocks of images (`lax.map`) so that no more than
`score_chunk_elements` entries of the (images, captions, D) tensor exist at once.

Where the released code differs from the paper (docs/METHODS.md §3.1-3.3), this follows the code: no PReLU or L2
normalisation inside MVSA, the channel mean is taken of H' (not of the raw high-level features), low level =
layer1 + layer2, uni-skip GRU with last-state pooling instead of a bi-GRU, no keyword branch, and the unused VGMF
fusion is left out. Our choices:
- the nearest upsampling goes to the size of the finer map (PyTorch's `nearest` with an output size: source index
  floor(i * in / out)); at sizes where that is 2x (256 px: f4 8 -> 16, f2 32 -> 64) it is the reference's
  `Upsample(scale_factor=2)`, and it also makes 80 px work (f4 3 -> 5 next to f3 5x5; the reference would fail);
- any image size that is a multiple of 16 works: L' and H' are then both size/16 square (256 px: f1 64 -> L' 16,
  f3 16; 80 px: f1 20 -> L' 5, f3 5; 32 px: f1 8 -> L' 2, f3 2), and the MVSA Linear has (size/16)^2 inputs;
- captions are read at position max(length, 1) - 1 (AMFMN infers lengths from non-zero ids and reads an empty
  caption at the batch's last step, which depends on the batch; HVSA's length-1 rule is used instead);
- new layers use PyTorch's default init; norms are square roots floored at 1e-30, so that their gradient stays
  finite for an all-zero (ReLU) text vector; the 1e-8 clamp makes the values identical;
- options (models/towers.py): a pretrained EfficientNet-Lite trunk in place of ResNet-18 (`image_backbone`; its
  f1..f4 feed MVSA the same way), MiniLM/BERT in place of the GRU (`text_encoder='bert'`), `frozen` towers.
"""
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rsalign_jax.similarity import pairwise_dot
from rsalign_jax.models import base
from rsalign_jax.models import convolution
from rsalign_jax.models import layers
from rsalign_jax.models import towers

ATT_TYPES = ("soft_att", "fusion_att", "similarity_att")
_EPS = 1e-8  # the reference's cosine clamp on the product of norms
_TINY = 1e-30  # keeps sqrt's gradient finite at 0 without changing any clamped value


def _safe_sqrt(x):
  return jnp.sqrt(jnp.maximum(x, _TINY))


def nearest_resize(x: jax.Array, height: int, width: int) -> jax.Array:
  """PyTorch `interpolate(mode='nearest', size=...)` on NHWC: row i reads source row floor(i * in / out)."""
  rows = (jnp.arange(height) * x.shape[1]) // height
  cols = (jnp.arange(width) * x.shape[2]) // width
  return x[:, rows][:, :, cols]


def torch_conv(features: int, kernel: int, stride: int, in_features: int, dtype: Any, name: str) -> nn.Conv:
  """nn.Conv initialised like torch.nn.Conv2d (kernel and bias U(+-1/sqrt(fan_in))), VALID padding."""
  return nn.Conv(features, (kernel, kernel), strides=stride, padding="VALID", kernel_init=layers.torch_kernel_init,
                 bias_init=layers.torch_bias_init(in_features * kernel * kernel), dtype=dtype,
                 conv_general_dilated=convolution.conv_general_dilated, name=name)


class MVSA(nn.Module):
  """Multiscale visual self-attention (`VSA_Module`): the global feature gated by a map of low+high level features."""
  embed_dim: int
  channels: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, low: jax.Array, high: jax.Array, solo: jax.Array) -> jax.Array:
    c = self.channels
    low = torch_conv(c, 3, 4, low.shape[-1], self.dtype, "lf_conv")(low)
    high = torch_conv(c, 1, 1, high.shape[-1], self.dtype, "hf_conv")(high)
    if low.shape[1:3] != high.shape[1:3]:
      raise ValueError(f"MVSA: low-level map {low.shape[1:3]} != high-level map {high.shape[1:3]} after the stride-4 "
                       "conv; the image size must be a multiple of 16 (e.g. 80 or 256 px)")
    joint = jnp.concatenate([low, high], axis=-1)
    joint = joint + high.mean(axis=-1, keepdims=True)
    main = torch_conv(1, 1, 1, 2 * c, self.dtype, "conv1x1_1")(joint)
    gate = jax.nn.sigmoid(torch_conv(1, 1, 1, 2 * c, self.dtype, "conv1x1_2")(joint))
    attended = (main * gate).reshape(main.shape[0], -1)
    mask = jax.nn.sigmoid(layers.torch_dense(self.embed_dim, fan_in=attended.shape[-1], dtype=self.dtype,
                                             name="solo_attention")(attended))
    return solo * mask


def _matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jnp.matmul(x, kernel, precision=jax.lax.Precision.HIGHEST)


class ConcatDense(nn.Module):
  """torch.nn.Linear(2D, D) on [v; t], stored as one (2D, D) kernel but applied as v W_v + b and t W_t separately,
  so that the pairwise sum over all (i, j) never builds the concatenation."""
  features: int

  @nn.compact
  def __call__(self, visual: jax.Array, text: jax.Array) -> tuple[jax.Array, jax.Array]:
    fan_in = visual.shape[-1] + text.shape[-1]
    kernel = self.param("kernel", layers.torch_kernel_init, (fan_in, self.features))
    bias = self.param("bias", layers.torch_bias_init(fan_in), (self.features,))
    d = visual.shape[-1]
    return _matmul(visual, kernel[:d]) + bias, _matmul(text, kernel[d:])


def cosine_to_attended(visual: jax.Array, attended: jax.Array) -> jax.Array:
  """cos(v_i, Ft_ij) for v (b, D) and Ft (b, M, D) -> (b, M), clamped like the reference."""
  dots = jnp.einsum("bd,bmd->bm", visual, attended, precision=jax.lax.Precision.HIGHEST)
  norms = _safe_sqrt(jnp.sum(visual * visual, -1))[:, None] * _safe_sqrt(jnp.sum(attended * attended, -1))
  return dots / jnp.maximum(norms, _EPS)


class CrossAttention(nn.Module):
  """Visual-guided text attention and the cosine score (`CrossAttention` + `BaseModel.forward`)."""
  att_type: str = "soft_att"
  chunk_elements: int = 1 << 23

  @nn.compact
  def __call__(self, visual: jax.Array, text: jax.Array) -> jax.Array:
    """(N, D) image vectors F_v and (M, D) text vectors t -> (N, M) scores."""
    if self.att_type not in ATT_TYPES:
      raise ValueError(f"model.att_type={self.att_type!r}: expected one of {ATT_TYPES}")
    d = visual.shape[-1]
    if self.att_type == "soft_att":
      gate = jax.nn.sigmoid(layers.torch_dense(d, fan_in=d, name="gate")(visual))
      numerator = pairwise_dot(visual * gate, text)
      text_norms = _safe_sqrt(pairwise_dot(gate * gate, text * text))
      return numerator / jnp.maximum(_safe_sqrt(jnp.sum(visual * visual, -1))[:, None] * text_norms, _EPS)

    block = max(1, self.chunk_elements // (text.shape[0] * d))
    if self.att_type == "fusion_att":
      gate_v, gate_t = ConcatDense(d, name="fc1")(visual, text)
      value_v, value_t = ConcatDense(d, name="fc2")(visual, text)

      def fusion_scores(rows):
        v, g, a = rows
        attended = jax.nn.sigmoid(g[:, None] + gate_t[None]) * (a[:, None] + value_t[None])
        return cosine_to_attended(v, attended)
      return layers.map_in_blocks(fusion_scores, (visual, gate_v, value_v), block)

    visual_proj = layers.torch_dense(d, fan_in=d, name="fc_visual")(visual)
    text_proj = layers.torch_dense(d, fan_in=d, name="fc_text")(text)

    def projected_scores(rows):
      v, p = rows
      attended = jax.nn.sigmoid(p[:, None] * text_proj[None]) * text_proj[None]
      return cosine_to_attended(v, attended)
    return layers.map_in_blocks(projected_scores, (visual, visual_proj), block)


class Model(towers.SwappableTowers, base.RetrievalModel):
  """AMFMN's towers and its image-conditioned score (module docstring)."""
  PAIRWISE = True
  TRUNKS = ("text",)  # the heads read every image map, the image trunk cache holds only the last
  vocab_size: int
  embed_dim: int = 512
  resnet_depth: int = 18
  resnet_width: int = 64
  mvsa_channels: int = 3
  att_type: str = "soft_att"
  word_dim: int = 620
  hidden_dim: int = 2400
  text_dropout: float = 0.25
  score_chunk_elements: int = 1 << 23
  image_backbone: str = "resnet"
  text_encoder: str = "gru"
  bert_config: Mapping[str, Any] | None = None
  frozen: tuple[str, ...] = ()
  precomputed: tuple[str, ...] = ()
  dtype: Any = jnp.float32

  def setup(self):
    self.setup_towers()
    self.solo_fc = layers.torch_dense(self.embed_dim, fan_in=self.image_features_dim, dtype=self.dtype)
    self.mvsa = MVSA(self.embed_dim, self.mvsa_channels, self.dtype)
    self.text_fc = layers.torch_dense(self.embed_dim, fan_in=self.sentence_dim, dtype=self.dtype)
    self.cross_attention = CrossAttention(self.att_type, self.score_chunk_elements)

  def embed_images(self, images: jax.Array, *, train: bool) -> jax.Array:
    """(B, H, W, 3) normalised images (H = W a multiple of 16) -> (B, embed_dim) float32 F_v."""
    f = self.image_features(images, train=train)
    low = jnp.concatenate([f["f1"], nearest_resize(f["f2"], *f["f1"].shape[1:3])], axis=-1)
    high = jnp.concatenate([f["f3"], nearest_resize(f["f4"], *f["f3"].shape[1:3])], axis=-1)
    solo = self.solo_fc(f["f4"].mean(axis=(1, 2)))
    return self.mvsa(low, high, solo).astype(jnp.float32)

  def embed_texts(self, tokens: jax.Array, lengths: jax.Array, *, train: bool) -> jax.Array:
    """(B, T) 0-padded token ids and (B,) lengths -> (B, embed_dim) float32 t, non-negative."""
    sentences = self.sentence_features(tokens, lengths, train=train)
    return nn.relu(self.text_fc(sentences.astype(self.dtype))).astype(jnp.float32)

  def __call__(self, images: jax.Array, tokens: jax.Array, lengths: jax.Array, *,
               train: bool) -> dict[str, jax.Array]:
    """The (B, B) score matrix of the batch (pairs on the diagonal)."""
    return dict(scores=self.score(self.embed_images(images, train=train),
                                  self.embed_texts(tokens, lengths, train=train)))

  def score(self, image_embedding: jax.Array, text_embedding: jax.Array) -> jax.Array:
    """(N, M) float32 scores S_ij = cos(F_v_i, Ft_ij) of precomputed tower outputs (chunked inside)."""
    return self.cross_attention(image_embedding.astype(jnp.float32), text_embedding.astype(jnp.float32))
