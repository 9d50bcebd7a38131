"""The uni-skip GRU sentence encoder with variational dropout ("BayesianUniSkip", docs/METHODS.md §1.5).

A word embedding feeds a GRU whose biases sit on the input path only; the sentence vector is the hidden state at
the last real token. Parameters carry the names, shapes and (in, out) layout of Kiros et al.'s `uni_skip.npz`
(encoder_W, encoder_b, encoder_U for the reset|update gates; encoder_Wx, encoder_bx, encoder_Ux for the candidate),
so pretrained weights load without reshaping. Offline they start from PyTorch's GRU init instead.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rsalign_jax.models import recurrence
from rsalign_jax.models.layers import symmetric_uniform


def embedding_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
  """torch.nn.Embedding's N(0, 1), with the padding row 0 zeroed."""
  return jax.random.normal(key, shape, dtype).at[0].set(0)


def variational_dropout_masks(rng: jax.Array, rate: float, shapes: Sequence[Sequence[int]]) -> list[jax.Array]:
  """One independent inverted-dropout mask per shape, Bernoulli(1 - rate) / (1 - rate)."""
  keep = 1.0 - rate
  keys = jax.random.split(rng, len(shapes))
  return [jax.random.bernoulli(k, keep, s).astype(jnp.float32) / keep for k, s in zip(keys, shapes)]


class BayesianUniSkip(nn.Module):
  """Uni-skip GRU over 0-padded token ids; returns the (B, hidden_dim) state at position max(length, 1) - 1.

  Per step, with x~ and h~ the dropped-out copies of x_t and h_{t-1} (one mask per gate and path):
    r = sig(x~_r W_r + b_r + h~_r U_r);  z = sig(x~_z W_z + b_z + h~_z U_z)
    n = tanh(x~_n Wx + bx + r * (h~_n Ux));  h_t = (1 - z) * n + z * h_{t-1}.
  When training, the six masks are drawn once per call from the 'dropout' rng and shared by all time steps.
  An empty caption (length 0) is read after one step on the zero padding vector, as HVSA does.
  With `all_states=True` it returns the (B, T, hidden_dim) states of every step instead (word features).
  """
  vocab_size: int
  word_dim: int = 620
  hidden_dim: int = 2400
  dropout: float = 0.25
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, lengths: jax.Array, *, train: bool, all_states: bool = False) -> jax.Array:
    e, h = self.word_dim, self.hidden_dim
    gru_init = symmetric_uniform(1 / h**0.5)  # PyTorch's GRU init
    table = self.param("embedding", embedding_init, (self.vocab_size + 1, e))
    w = self.param("encoder_W", gru_init, (e, 2 * h))
    b = self.param("encoder_b", gru_init, (2 * h,))
    u = self.param("encoder_U", gru_init, (h, 2 * h))
    wx = self.param("encoder_Wx", gru_init, (e, h))
    bx = self.param("encoder_bx", gru_init, (h,))
    ux = self.param("encoder_Ux", gru_init, (h, h))

    batch, max_len = tokens.shape
    # Multiplying by the mask (rather than relying on row 0 being zero) also keeps the padding row's gradient zero.
    words = jnp.take(table, tokens, axis=0) * (tokens != 0)[..., None]
    if train and self.dropout > 0:
      masks = variational_dropout_masks(self.make_rng("dropout"), self.dropout,
                                        [(batch, 1, e)] * 3 + [(batch, h)] * 3)
    else:
      masks = [jnp.ones((1, 1, e), jnp.float32)] * 3 + [jnp.ones((batch, h), jnp.float32)] * 3
    x_mask_r, x_mask_z, x_mask_n, h_mask_r, h_mask_z, h_mask_n = masks

    # Input projections for all steps at once, time-major, in `dtype`; the state and gates stay float32.
    def project(x, kernel):
      return jnp.einsum("bte,eh->tbh", x.astype(self.dtype), kernel.astype(self.dtype)).astype(jnp.float32)

    inputs = (project(words * x_mask_r, w[:, :h]) + b[:h], project(words * x_mask_z, w[:, h:]) + b[h:],
              project(words * x_mask_n, wx) + bx)
    last = jnp.maximum(lengths, 1) - 1
    # Steps past the longest caption are read by no one (unless every state is returned): they are not run.
    steps = jnp.asarray(max_len) if all_states else jnp.minimum(last.max() + 1, max_len)
    states = recurrence.gru_states(self.dtype, inputs, (u[:, :h], u[:, h:], ux), (h_mask_r, h_mask_z, h_mask_n),
                                   steps)
    if all_states:
      return jnp.swapaxes(states, 0, 1)
    return states[last, jnp.arange(batch)]
