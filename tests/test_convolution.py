"""models/convolution: the same convolution and gradients as XLA's, and its transposes kept out of fusions on CPU."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsalign_jax.models import convolution


def lax_conv(x, kernel, stride, padding):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def numpy_kernel_gradient(x, grad, kernel_hw, stride, padding):
  """sum over batch and output pixels of (input window) outer (output gradient), one tap at a time."""
  (top, bottom), (left, right) = padding
  padded = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  out_h, out_w = grad.shape[1:3]
  result = np.zeros(kernel_hw + (x.shape[-1], grad.shape[-1]))
  for dy in range(kernel_hw[0]):
    for dx in range(kernel_hw[1]):
      window = padded[:, dy:dy + (out_h - 1) * stride + 1:stride, dx:dx + (out_w - 1) * stride + 1:stride]
      result[dy, dx] = np.einsum("bhwi,bhwo->io", window, grad)
  return result


CASES = [((3, 3), 1, ((1, 1), (1, 1))), ((3, 3), 2, ((1, 1), (1, 1))), ((1, 1), 2, ((0, 0), (0, 0))),
         ((7, 7), 2, ((3, 3), (3, 3))), ((1, 3), 1, ((0, 0), (1, 1))), ((3, 3), 2, ((0, 1), (0, 1)))]


@pytest.mark.parametrize("kernel_hw, stride, padding", CASES)
def test_kernel_gradient_matches_numpy_reference(kernel_hw, stride, padding):
  x = jax.random.normal(jax.random.key(0), (3, 11, 10, 4))
  out = lax_conv(x, jnp.zeros(kernel_hw + (4, 5)), stride, padding)
  grad = jax.random.normal(jax.random.key(1), out.shape)
  np.testing.assert_allclose(convolution.kernel_gradient(x, grad, kernel_hw, stride, padding),
                             numpy_kernel_gradient(np.asarray(x), np.asarray(grad), kernel_hw, stride, padding),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel_hw, stride, padding", CASES)
def test_conv2d_value_and_gradients_equal_autodiff_of_lax(kernel_hw, stride, padding):
  x = jax.random.normal(jax.random.key(0), (2, 12, 12, 6))
  kernel = jax.random.normal(jax.random.key(1), kernel_hw + (6, 8))
  # A ReLU-and-residual chain before the convolution: what the CPU backward would otherwise fuse into its transposes.
  loss = lambda conv, x, kernel: jnp.sum(jnp.sin(conv(jax.nn.relu(x) + x, kernel, stride, padding)))
  value, grads = jax.jit(jax.value_and_grad(lambda x, k: loss(convolution.conv2d, x, k), argnums=(0, 1)))(x, kernel)
  ref_value, ref_grads = jax.value_and_grad(lambda x, k: loss(lax_conv, x, k), argnums=(0, 1))(x, kernel)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  for got, want in zip(grads, ref_grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_flax_conv_with_it_has_the_same_parameters_outputs_and_gradients():
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
  plain = nn.Conv(4, (3, 3), strides=2, padding="SAME")
  ours = nn.Conv(4, (3, 3), strides=2, padding="SAME", conv_general_dilated=convolution.conv_general_dilated)
  params = plain.init(jax.random.key(1), x)
  assert jax.tree.all(jax.tree.map(jnp.array_equal, params, ours.init(jax.random.key(1), x)))
  loss = lambda module: jax.grad(lambda p: jnp.sum(module.apply(p, x) ** 2))(params)
  np.testing.assert_allclose(ours.apply(params, x), plain.apply(params, x), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), loss(ours), loss(plain))


def test_calls_it_does_not_cover_go_to_lax():
  x, kernel = jax.random.normal(jax.random.key(0), (2, 9, 9, 4)), jax.random.normal(jax.random.key(1), (3, 3, 2, 6))
  numbers = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
  grouped = convolution.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=numbers,
                                             feature_group_count=2)
  np.testing.assert_allclose(grouped, jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                                                   dimension_numbers=numbers, feature_group_count=2))
  dilated = lambda conv: conv(x, kernel, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=numbers,
                              feature_group_count=2)
  np.testing.assert_allclose(dilated(convolution.conv_general_dilated), dilated(jax.lax.conv_general_dilated))


def test_cpu_kernel_gradient_transposes_behind_a_conditional():
  x, kernel = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
  loss = lambda x, k: jnp.sin(convolution.conv2d(jax.nn.relu(x) + x, k, 1, ((1, 1), (1, 1)))).sum()
  hlo = jax.jit(jax.grad(loss, argnums=1)).lower(x, kernel).compile().as_text()
  assert "conditional(" in hlo
