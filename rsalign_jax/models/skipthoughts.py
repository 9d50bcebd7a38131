"""The uni-skip GRU sentence encoder with variational dropout ("BayesianUniSkip", METHODS 1.5).

A word embedding feeds a GRU whose biases sit on the input path only; the sentence vector is the hidden state at
the last real token. Parameters carry the names, shapes and (in, out) layout of Kiros et al.'s `uni_skip.npz`
(encoder_W, encoder_b, encoder_U for the reset|update gates; encoder_Wx, encoder_bx, encoder_Ux for the candidate),
so pretrained weights load without reshaping. Offline they start from PyTorch's GRU init instead.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

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

    batch, _ = tokens.shape
    # Multiplying by the mask (rather than relying on row 0 being zero) also keeps the padding row's gradient zero.
    words = jnp.take(table, tokens, axis=0) * (tokens != 0)[..., None]
    if train and self.dropout > 0:
      masks = variational_dropout_masks(self.make_rng("dropout"), self.dropout,
                                        [(batch, 1, e)] * 3 + [(batch, h)] * 3)
    else:
      masks = [1.0] * 6
    x_mask_r, x_mask_z, x_mask_n, h_mask_r, h_mask_z, h_mask_n = masks

    # Matmuls run in `dtype`; gates and the state stay float32 (adding the float32 biases/inputs promotes).
    def matmul(x, kernel, spec):
      return jnp.einsum(spec, x.astype(self.dtype), kernel.astype(self.dtype))

    # Input projections for all steps at once, time-major; only the hidden matmuls run inside the scan.
    x_r = matmul(words * x_mask_r, w[:, :h], "bte,eh->tbh") + b[:h]
    x_z = matmul(words * x_mask_z, w[:, h:], "bte,eh->tbh") + b[h:]
    x_n = matmul(words * x_mask_n, wx, "bte,eh->tbh") + bx
    u_r, u_z, u_n = u[:, :h], u[:, h:], ux

    def step(state, inputs):
      in_r, in_z, in_n = inputs
      r = jax.nn.sigmoid(in_r + matmul(state * h_mask_r, u_r, "bk,kh->bh"))
      z = jax.nn.sigmoid(in_z + matmul(state * h_mask_z, u_z, "bk,kh->bh"))
      n = jnp.tanh(in_n + r * matmul(state * h_mask_n, u_n, "bk,kh->bh"))
      state = (1 - z) * n + z * state
      return state, state

    _, states = jax.lax.scan(step, jnp.zeros((batch, h), jnp.float32), (x_r, x_z, x_n))
    if all_states:
      return jnp.swapaxes(states, 0, 1)
    last = jnp.maximum(lengths, 1) - 1
    return states[last, jnp.arange(batch)]
