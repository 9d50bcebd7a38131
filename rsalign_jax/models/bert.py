"""BERT / MiniLM text encoder (post-LayerNorm Transformer) in Flax, plus sentence pooling.

Follows Hugging Face's `BertModel` so that its checkpoints load one to one (rsalign_jax.weights.bert): word +
absolute position + token-type embeddings -> LayerNorm -> dropout, then `layers` post-LN blocks (self-attention ->
dropout -> residual -> LayerNorm; Dense -> exact (erf) GELU -> Dense -> dropout -> residual -> LayerNorm). Padding is
given by `lengths`: keys at positions >= length are masked out of every attention row (padded queries still get an
output, as in BERT). All tokens are segment 0. BERT's pooler (Dense + tanh on [CLS]) is not part of the tower: the
retrieval models pool with `mean_pool` (sentence-transformers' all-MiniLM-L6-v2) or `cls_pool`.

Module names mirror the checkpoint: `word_embeddings`, `position_embeddings`, `token_type_embeddings`,
`embeddings_layernorm`, and `layer_{i}/{query,key,value,attention_output,attention_layernorm,intermediate,output,
output_layernorm}` for `encoder.layer.{i}.{attention.self.*, attention.output.dense, attention.output.LayerNorm,
intermediate.dense, output.dense, output.LayerNorm}`. Dense kernels are (in, out), i.e. PyTorch's weight transposed.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# BERT's initializer_range: weights and embeddings start from N(0, 0.02^2), biases from 0.
bert_init = nn.initializers.normal(0.02)


def dense(features: int, dtype: Any, name: str) -> nn.Dense:
  return nn.Dense(features, kernel_init=bert_init, dtype=dtype, name=name)


class BertLayer(nn.Module):
  """One post-LN Transformer block; `mask` is (B, 1, 1, T), True where a key is a real token."""
  hidden: int
  heads: int
  intermediate: int
  layer_norm_eps: float
  dropout: float
  attention_dropout: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
    b, t, _ = x.shape
    head_dim = self.hidden // self.heads
    split = lambda y: y.reshape(b, t, self.heads, head_dim)
    q, k, v = (split(dense(self.hidden, self.dtype, name)(x)) for name in ("query", "key", "value"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / head_dim**0.5
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = nn.Dropout(self.attention_dropout)(jax.nn.softmax(logits, axis=-1), deterministic=not train)
    context = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v).reshape(b, t, self.hidden)
    y = nn.Dropout(self.dropout)(dense(self.hidden, self.dtype, "attention_output")(context), deterministic=not train)
    x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="attention_layernorm")(x + y)
    y = jax.nn.gelu(dense(self.intermediate, self.dtype, "intermediate")(x), approximate=False)
    y = nn.Dropout(self.dropout)(dense(self.hidden, self.dtype, "output")(y), deterministic=not train)
    return nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="output_layernorm")(x + y)


class Bert(nn.Module):
  """BERT encoder: (B, T) token ids, (B,) lengths -> (B, T, hidden) last hidden states in `dtype`.

  Defaults are all-MiniLM-L6-v2's; rsalign_jax.weights.bert.load_bert returns the attributes of a checkpoint.
  """
  vocab_size: int = 30522
  hidden: int = 384
  layers: int = 6
  heads: int = 12
  intermediate: int = 1536
  max_position: int = 512
  type_vocab: int = 2
  layer_norm_eps: float = 1e-12
  dropout: float = 0.1
  attention_dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, lengths: jax.Array, *, train: bool) -> jax.Array:
    if self.hidden % self.heads:
      raise ValueError(f"Bert: hidden={self.hidden} is not a multiple of heads={self.heads}")
    t = tokens.shape[1]
    if t > self.max_position:
      raise ValueError(f"Bert: {t} tokens per caption but max_position={self.max_position}")
    embed = lambda n, name: nn.Embed(n, self.hidden, embedding_init=bert_init, dtype=self.dtype, name=name)
    x = (embed(self.vocab_size, "word_embeddings")(tokens)
         + embed(self.max_position, "position_embeddings")(jnp.arange(t))[None]
         + embed(self.type_vocab, "token_type_embeddings")(jnp.zeros_like(tokens)))
    x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="embeddings_layernorm")(x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    mask = (jnp.arange(t)[None, :] < lengths[:, None])[:, None, None, :]
    for i in range(self.layers):
      x = BertLayer(self.hidden, self.heads, self.intermediate, self.layer_norm_eps, self.dropout,
                    self.attention_dropout, self.dtype, name=f"layer_{i}")(x, mask, train=train)
    return x


def mean_pool(hidden: jax.Array, lengths: jax.Array) -> jax.Array:
  """sentence-transformers' mean pooling: float32 average of the first `lengths` token states ((B, T, H) -> (B, H))."""
  mask = (jnp.arange(hidden.shape[1])[None, :] < lengths[:, None]).astype(jnp.float32)
  total = jnp.einsum("bth,bt->bh", hidden.astype(jnp.float32), mask)
  return total / jnp.maximum(mask.sum(axis=1, keepdims=True), 1e-9)


def cls_pool(hidden: jax.Array) -> jax.Array:
  """The [CLS] (first) token's state as float32, (B, T, H) -> (B, H)."""
  return hidden[:, 0].astype(jnp.float32)
