"""PyTorch's MaxPool2d with a gradient that routes to the first maximum of each window.

The forward is XLA's reduce-window. Autodiff of it (on CPU a variadic reduce-window carrying four int32 index maps
of the padded input, then select-and-scatter) makes many input-sized passes and dominated the ResNet stem's
backward on CPU. The gradient here hands each output's gradient to the first window position (row-major) that holds
the maximum, as PyTorch and XLA's select-and-scatter do, by padding each tap's share back into place over strided
slices: the same values as autodiff of `nn.max_pool`, in fused loops.
"""
import functools

import jax
import jax.numpy as jnp

from rsalign_jax.models import layers


def _geometry(size: int, kernel: int, stride: int, padding: int) -> tuple[int, int]:
  """(output size, padded size the windows span) along one axis."""
  out = (size + 2 * padding - kernel) // stride + 1
  return out, size + 2 * padding


def _pad(x: jax.Array, padding: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, kernel: int = 3, stride: int = 2, padding: int = 1) -> jax.Array:
  """torch.nn.MaxPool2d(kernel, stride, padding) on NHWC: the padding is -inf, so it never wins over real values."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, kernel, kernel, 1), (1, stride, stride, 1),
                               ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def _forward(x, kernel, stride, padding):
  out = max_pool(x, kernel, stride, padding)
  return out, (x, out)


def _backward(kernel, stride, padding, residuals, grad):
  x, out = residuals
  b, height, width, c = x.shape
  (out_h, padded_h), (out_w, padded_w) = (_geometry(height, kernel, stride, padding),
                                          _geometry(width, kernel, stride, padding))
  taken = jnp.zeros(out.shape, bool)
  grad_padded = jnp.zeros((b, padded_h, padded_w, c), grad.dtype)
  zero = jnp.zeros((), grad.dtype)
  for dy, dx, tap in layers.strided_windows(_pad(x, padding), kernel, stride, out_h, out_w):
    first = (tap == out) & ~taken
    taken = taken | first
    share = jnp.where(first, grad, zero)
    grad_padded = grad_padded + jax.lax.pad(share, zero, (
        (0, 0, 0), (dy, padded_h - dy - (out_h - 1) * stride - 1, stride - 1),
        (dx, padded_w - dx - (out_w - 1) * stride - 1, stride - 1), (0, 0, 0)))
  return (grad_padded[:, padding:padding + height, padding:padding + width],)


max_pool.defvjp(_forward, _backward)
