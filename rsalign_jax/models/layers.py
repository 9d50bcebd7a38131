"""Small layers shared by the retrieval models.

PyTorch-default initialisers (so that layers the reference creates from scratch start from the same distribution)
and HVSA's Key-Entity Attention block.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's default Linear/Conv weight init, kaiming_uniform(a=sqrt(5)), is U(+-1/sqrt(fan_in)): a uniform
# variance scaling with scale 1/3. fan_in is read from Flax's (..., in, out) kernel layout.
torch_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
# The same for a matrix kept in PyTorch's (out, in) layout.
torch_weight_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=-1, out_axis=-2)


def symmetric_uniform(bound: float) -> jax.nn.initializers.Initializer:
  """U(-bound, bound)."""
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_bias_init(fan_in: int) -> jax.nn.initializers.Initializer:
  """PyTorch's default Linear/Conv bias init, U(+-1/sqrt(fan_in))."""
  return symmetric_uniform(1 / fan_in**0.5)


def torch_dense(features: int, fan_in: int, use_bias: bool = True, **kwargs) -> nn.Dense:
  """nn.Dense initialised like torch.nn.Linear(fan_in, features); also a 1x1 conv on NHWC inputs."""
  return nn.Dense(features, use_bias=use_bias, kernel_init=torch_kernel_init, bias_init=torch_bias_init(fan_in),
                  **kwargs)


def strided_windows(padded: jax.Array, kernel: int, stride: int, out_h: int, out_w: int):
  """(dy, dx, the strided (B, out_h, out_w, C) slice of the padded NHWC input under kernel tap (dy, dx)), row-major:
  what hand-written pooling and depthwise convolutions combine."""
  b, _, _, c = padded.shape
  for dy in range(kernel):
    for dx in range(kernel):
      end = (b, dy + (out_h - 1) * stride + 1, dx + (out_w - 1) * stride + 1, c)
      yield dy, dx, jax.lax.slice(padded, (0, dy, dx, 0), end, (1, stride, stride, 1))


def map_in_blocks(fn, tree, block: int):
  """fn(rows) -> outputs with one row per input row, over blocks of `block` leading rows of the pytree `tree`
  (`lax.map`: one block's intermediates live at a time); the last block is padded with copies of the last row (no
  zero-norm rows) and the padding cropped from the concatenated outputs."""
  n = len(jax.tree.leaves(tree)[0])
  if block >= n:
    return fn(tree)

  def split(x):
    padded = jnp.concatenate([x, jnp.repeat(x[-1:], -n % block, axis=0)])
    return padded.reshape((-1, block) + x.shape[1:])
  out = jax.lax.map(fn, jax.tree.map(split, tree))
  return jax.tree.map(lambda y: y.reshape((-1,) + y.shape[2:])[:n], out)


def batch_norm(train: bool, dtype: Any, name: str | None = None) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.1 = Flax 0.9, eps 1e-5); batch statistics when training."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)


class KeyEntityAttention(nn.Module):
  """HVSA's KEA (docs/METHODS.md §2.2): external attention over S learned memory slots, with double normalisation.

  X = conv1x1(x0) -> A = softmax_N(M_k X) -> A /= (1e-9 + sum_S A) -> Y = BN(conv1x1(M_v A)) -> ReLU(Y + x0).
  The memories are stored in PyTorch's Conv1d layout: key_memory M_k is (S, C), value_memory M_v is (C, S), and
  M_v starts as M_k^T (the reference ties them at init) but is trained as an independent parameter.
  """
  slots: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x0: jax.Array, *, train: bool) -> jax.Array:
    b, h, w, c = x0.shape
    x = torch_dense(c, fan_in=c, dtype=self.dtype, name="conv1")(x0).reshape(b, h * w, c)
    key_memory = self.param("key_memory", torch_weight_init, (self.slots, c))
    value_memory = self.param("value_memory", lambda _: key_memory.T)
    logits = jnp.einsum("bnc,sc->bns", x, key_memory.astype(self.dtype))
    attention = jax.nn.softmax(logits.astype(jnp.float32), axis=1)
    attention = attention / (1e-9 + attention.sum(axis=-1, keepdims=True))
    y = jnp.einsum("bns,cs->bnc", attention.astype(self.dtype), value_memory.astype(self.dtype))
    y = torch_dense(c, fan_in=c, use_bias=False, dtype=self.dtype, name="conv2")(y.reshape(b, h, w, c))
    y = batch_norm(train, self.dtype, name="bn")(y)
    return nn.relu(y + x0.astype(self.dtype))
