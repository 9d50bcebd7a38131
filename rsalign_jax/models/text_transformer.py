"""CLIP's text tower: a causal pre-LN Transformer over token + positional embeddings, then `ln_final`.

tokens (B, T) -> token embedding + positional embedding (max_len rows, the first T used) -> the ViT's residual
blocks under a causal mask -> `ln_final` -> (B, T, width) hidden states in `dtype`. Pooling is the dual encoder's
(`pool_tokens`): 'argmax' takes the state at the highest token id (CLIP's end-of-text token: OpenCLIP and HF CLIP
checkpoints), 'last' the state at position lengths-1 (the last real token; what the project's word and wordpiece
tokenizers need, since their ids are not ordered that way). With a causal mask no padding mask is needed: the pooled
position never attends to anything after it. Names follow OpenCLIP's keys: `token_embedding`,
`positional_embedding`, `transformer/resblock_{i}/...`, `ln_final`. Init (ours, from scratch only): token
embedding N(0, 0.02^2), positional embedding N(0, 0.01^2) as OpenCLIP.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rsalign_jax.models import vit

POOLS = ("argmax", "last")


class TextTransformer(nn.Module):
  """(B, T) token ids (any padding) -> (B, T, width) causal hidden states after the final LayerNorm."""
  vocab_size: int
  width: int = 512
  depth: int = 12
  heads: int = 8
  mlp_dim: int | None = None
  max_len: int = 77
  activation: str = "quick_gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool) -> jax.Array:
    del train  # no dropout
    t = tokens.shape[1]
    if t > self.max_len:
      raise ValueError(f"TextTransformer: {t} tokens per caption but max_len={self.max_len}")
    x = nn.Embed(self.vocab_size, self.width, embedding_init=vit.embedding_init, dtype=self.dtype,
                 name="token_embedding")(tokens)
    positions = self.param("positional_embedding", nn.initializers.normal(0.01), (self.max_len, self.width))
    x = x + positions[:t].astype(self.dtype)
    causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
    x = vit.Transformer(self.depth, self.heads, self.mlp_dim, self.activation, self.dtype, name="transformer")(
        x, causal)
    return vit.layer_norm(self.dtype, "ln_final")(x)


def pool_tokens(hidden: jax.Array, tokens: jax.Array, lengths: jax.Array, pool: str) -> jax.Array:
  """(B, T, W) -> (B, W) at each row's pooled position: 'argmax' of the token ids or 'last' = lengths - 1
  (clipped to 0 for empty captions)."""
  if pool == "argmax":
    index = jnp.argmax(tokens, axis=1)
  elif pool == "last":
    index = jnp.clip(lengths - 1, 0, hidden.shape[1] - 1)
  else:
    raise ValueError(f"text pool={pool!r}: expected one of {POOLS}")
  return jnp.take_along_axis(hidden, index[:, None, None].astype(jnp.int32), axis=1)[:, 0]
