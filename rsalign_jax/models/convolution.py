"""A 2-D convolution (NHWC, HWIO) whose kernel gradient on CPU reads its operands through unfused transposes.

XLA:CPU computes a kernel gradient with Eigen's convolution, which needs the activations as (C, H, W, N) and the
output gradient as (H, W, N, C): XLA inserts both transposes and fuses into each the elementwise chain that produced
its operand (BatchNorm, ReLU, residual sums, re-read from up to three convolution outputs). Such a fused transpose
reads every input in strided order and runs an order of magnitude slower than transposing the stored array. Here
the backward transposes the stored activation and output gradient inside a `lax.cond` whose two branches are the
same transpose: XLA cannot fuse across a conditional, so each transpose is a plain copy, and the kernel gradient is
the same convolution over already transposed operands (the same values as XLA's own). Other backends fuse transposes
well and use XLA's gradient unchanged.
"""
import functools
import jax
import jax.numpy as jnp

Padding = tuple[tuple[int, int], tuple[int, int]]
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _convolve(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=_DIMENSIONS)


def _unfused_transpose(x: jax.Array, permutation: tuple[int, ...], predicate: jax.Array) -> jax.Array:
  """`jnp.transpose` that XLA cannot fuse with x's producers: both branches of the conditional are this transpose,
  so the (data-dependent) predicate only decides which copy of it runs."""
  return jax.lax.cond(predicate, lambda v: jnp.transpose(v, permutation),
                      lambda v: jnp.transpose(v, permutation), x)


def kernel_gradient(x: jax.Array, grad: jax.Array, kernel_hw: tuple[int, int], stride: int,
                    padding: Padding) -> jax.Array:
  """d(sum(grad * conv(x, kernel))) / d kernel as (kh, kw, C_in, C_out): a stride-1 convolution of the transposed
  activations (batch C_in, features N) with the transposed output gradient dilated by the stride."""
  (top, _), (left, _) = padding
  height, width = x.shape[1:3]
  out_h, out_w = grad.shape[1:3]
  predicate = grad.reshape(-1)[0] == 0
  activations = _unfused_transpose(x, (3, 1, 2, 0), predicate)
  window = _unfused_transpose(grad, (1, 2, 0, 3), predicate)
  pads = ((top, kernel_hw[0] + (out_h - 1) * stride - height - top),
          (left, kernel_hw[1] + (out_w - 1) * stride - width - left))
  per_input_channel = jax.lax.conv_general_dilated(activations, window, (1, 1), pads, rhs_dilation=(stride, stride),
                                                   dimension_numbers=_DIMENSIONS)
  return jnp.transpose(per_input_channel, (1, 2, 0, 3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: Padding) -> jax.Array:
  """`lax.conv_general_dilated` on NHWC/HWIO with explicit padding; the kernel gradient is `kernel_gradient`."""
  return _convolve(x, kernel, stride, padding)


def _conv2d_forward(x, kernel, stride, padding):
  return _convolve(x, kernel, stride, padding), (x, kernel)


def _conv2d_backward(stride, padding, residuals, grad):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda value: _convolve(value, kernel, stride, padding), x)
  (grad_x,) = input_vjp(grad)
  return grad_x, kernel_gradient(x, grad, kernel.shape[:2], stride, padding).astype(kernel.dtype)


conv2d.defvjp(_conv2d_forward, _conv2d_backward)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs) -> jax.Array:
  """`lax.conv_general_dilated` for `nn.Conv(conv_general_dilated=...)`: runs as `conv2d` on CPU when the call is
  one it covers (NHWC/HWIO, equal strides, no dilation or groups, default precision), else as lax's."""
  plain = (jax.default_backend() == "cpu" and lhs.ndim == 4 and len(set(window_strides)) == 1
           and set(lhs_dilation or (1,)) == {1} and set(rhs_dilation or (1,)) == {1} and feature_group_count == 1
           and precision is None and not kwargs
           and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMENSIONS))
  if not plain:
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, precision=precision, **kwargs)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  return conv2d(lhs, rhs, window_strides[0], tuple(tuple(pair) for pair in padding))
