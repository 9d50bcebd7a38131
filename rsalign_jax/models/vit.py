"""CLIP's Vision Transformer image tower, and the pre-LN Transformer blocks it shares with the text tower.

patches (a p x p stride-p conv, no bias) -> [class token] + positional embeddings -> LayerNorm (`ln_pre`) ->
`depth` pre-LN residual blocks (x + attn(ln_1(x)), x + mlp(ln_2(x)), MLP = fc1 -> quick_gelu | gelu -> fc2) ->
`ln_post` on every token -> pooled: the class token ('cls', CLIP), a multihead-attention pooling head ('map',
big_vision/SigLIP's MAPHead) or the token mean ('gap'). Returns the pooled (B, width) features; the dual encoder
projects them. No dropout (neither CLIP nor OpenCLIP uses any). LayerNorm eps is PyTorch's 1e-5.

Names follow OpenCLIP's `visual.*` keys so both OpenCLIP and HF CLIPVisionModel checkpoints map one to one
(rsalign_jax.weights.clip): `conv1`, `class_embedding`, `positional_embedding`, `ln_pre`, `resblock_{i}/{ln_1,
attn/{query,key,value,out}, ln_2, mlp/{fc1,fc2}}`, `ln_post`. Attention keeps separate q/k/v Dense layers (OpenCLIP's
fused in_proj is split on import). Initialisation (ours, from-scratch training only): Dense kernels Xavier-uniform
with zero biases, class/positional embeddings N(0, 0.02^2).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

LAYER_NORM_EPS = 1e-5
ACTIVATIONS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
               "gelu": lambda x: jax.nn.gelu(x, approximate=False)}
POOLS = ("cls", "map", "gap")

embedding_init = nn.initializers.normal(0.02)


def layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(LAYER_NORM_EPS, dtype=dtype, name=name)


def dense(features: int, dtype: Any, name: str) -> nn.Dense:
  return nn.Dense(features, kernel_init=nn.initializers.xavier_uniform(), dtype=dtype, name=name)


class Attention(nn.Module):
  """Multi-head attention of `x` (queries) over `context` (keys/values; default `x`); `mask` broadcasts to
  (B, heads, Tq, Tk), True where attending is allowed. Logits and softmax in float32."""
  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
    context = x if context is None else context
    width = x.shape[-1]
    if width % self.heads:
      raise ValueError(f"attention width {width} is not a multiple of heads={self.heads}")
    head_dim = width // self.heads
    split = lambda y: y.reshape(y.shape[:-1] + (self.heads, head_dim))
    q = split(dense(width, self.dtype, "query")(x))
    k = split(dense(width, self.dtype, "key")(context))
    v = split(dense(width, self.dtype, "value")(context))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / head_dim**0.5
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape[:-1] + (width,))
    return dense(width, self.dtype, "out")(out)


class Mlp(nn.Module):
  hidden: int
  activation: str = "quick_gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = ACTIVATIONS[self.activation](dense(self.hidden, self.dtype, "fc1")(x))
    return dense(x.shape[-1], self.dtype, "fc2")(y)


class ResidualBlock(nn.Module):
  """x + attn(ln_1(x)) then x + mlp(ln_2(x))."""
  heads: int
  mlp_dim: int
  activation: str = "quick_gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    x = x + Attention(self.heads, self.dtype, name="attn")(layer_norm(self.dtype, "ln_1")(x), mask=mask)
    return x + Mlp(self.mlp_dim, self.activation, self.dtype, name="mlp")(layer_norm(self.dtype, "ln_2")(x))


class Transformer(nn.Module):
  """`depth` residual blocks named `resblock_{i}`; MLP width `mlp_dim` (default 4 x the model width)."""
  depth: int
  heads: int
  mlp_dim: int | None = None
  activation: str = "quick_gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation={self.activation!r}: expected one of {sorted(ACTIVATIONS)}")
    mlp_dim = self.mlp_dim or 4 * x.shape[-1]
    for i in range(self.depth):
      x = ResidualBlock(self.heads, mlp_dim, self.activation, self.dtype, name=f"resblock_{i}")(x, mask)
    return x


class MapHead(nn.Module):
  """Multihead attention pooling (big_vision's MAPHead): a learned probe attends over the tokens, plus an MLP."""
  heads: int
  mlp_dim: int | None = None
  activation: str = "gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, width))
    probe = jnp.broadcast_to(probe.astype(self.dtype), (x.shape[0], 1, width))
    y = Attention(self.heads, self.dtype, name="attn")(probe, x)
    z = layer_norm(self.dtype, "ln")(y)
    y = y + Mlp(self.mlp_dim or 4 * width, self.activation, self.dtype, name="mlp")(z)
    return y[:, 0]


class ViT(nn.Module):
  """(B, H, W, 3) images -> (B, width) pooled features in `dtype`; H and W must be multiples of `patch_size`."""
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_dim: int | None = None
  pool: str = "cls"
  activation: str = "quick_gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    del train  # no dropout or batch statistics
    if self.pool not in POOLS:
      raise ValueError(f"ViT pool={self.pool!r}: expected one of {POOLS}")
    _, h, w, _ = images.shape
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(f"ViT: image size {h}x{w} is not a multiple of patch_size={self.patch_size}")
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=p, padding="VALID", use_bias=False, dtype=self.dtype,
                name="conv1")(images.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, self.width)
    if self.pool == "cls":
      cls = self.param("class_embedding", embedding_init, (self.width,)).astype(self.dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), x], axis=1)
    positions = self.param("positional_embedding", embedding_init, (x.shape[1], self.width))
    x = layer_norm(self.dtype, "ln_pre")(x + positions.astype(self.dtype))
    x = Transformer(self.depth, self.heads, self.mlp_dim, self.activation, self.dtype, name="transformer")(x)
    x = layer_norm(self.dtype, "ln_post")(x)
    if self.pool == "cls":
      return x[:, 0]
    if self.pool == "map":
      return MapHead(self.heads, self.mlp_dim, self.activation, self.dtype, name="map_head")(x)
    return x.mean(axis=1)
