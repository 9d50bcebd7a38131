"""The uni-skip GRU's recurrence with a hand-written backward pass, run only as far as the batch needs.

Autodiff of a `lax.scan` adds every step's (H, H) outer product into the recurrent kernels' gradients inside the
loop: for the paper's 2400-d state, three 23 MB read-modify-writes per step, which dominated the text tower's
backward on CPU. Here the backward loop produces only the per-step gradients of the gate pre-activations
(B, H) and the recurrent kernels' gradients are three matmuls over all steps at once after it, as cuDNN's and
PyTorch's GRUs do. Both loops stop at `steps` (a traced value: the longest caption in the batch), like the papers'
code that runs the GRU to the batch's longest caption, with one compiled program for every batch.
"""
import functools
from typing import Any

import jax
import jax.numpy as jnp


def _matmul(x: jax.Array, kernel: jax.Array, dtype: Any) -> jax.Array:
  return jnp.dot(x.astype(dtype), kernel.astype(dtype)).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gru_states(dtype: Any, inputs: tuple, kernels: tuple, masks: tuple, steps: jax.Array) -> jax.Array:
  """The (T, B, H) float32 states of a GRU whose input projections are precomputed; rows from `steps` on are 0.

  inputs: the (T, B, H) float32 input paths x_r, x_z, x_n (dropped-out words times W, plus biases); kernels: the
  (H, H) recurrent kernels U_r, U_z, U_n (matmuls run in `dtype`); masks: the (B, H) dropout masks of the state on
  each path; steps: int32 scalar, how many steps to run. Per step, from h = 0:
    r = sig(x_r + (h m_r) U_r);  z = sig(x_z + (h m_z) U_z);  n = tanh(x_n + r * ((h m_n) U_n));
    h = (1 - z) * n + z * h.
  """
  return _forward(dtype, inputs, kernels, masks, steps)[0]


def _forward(dtype, inputs, kernels, masks, steps):
  inputs, kernels, masks = jax.tree.map(jnp.asarray, (inputs, kernels, masks))
  (x_r, x_z, x_n), (u_r, u_z, u_n), (m_r, m_z, m_n) = inputs, kernels, masks
  zeros = jnp.zeros(x_r.shape, jnp.float32)

  def step(t, carry):
    state, saved = carry
    r = jax.nn.sigmoid(x_r[t] + _matmul(state * m_r, u_r, dtype))
    z = jax.nn.sigmoid(x_z[t] + _matmul(state * m_z, u_z, dtype))
    hidden_n = _matmul(state * m_n, u_n, dtype)
    n = jnp.tanh(x_n[t] + r * hidden_n)
    state = (1 - z) * n + z * state
    return state, tuple(buffer.at[t].set(value) for buffer, value in zip(saved, (state, r, z, n, hidden_n)))

  _, saved = jax.lax.fori_loop(0, steps, step, (zeros[0], (zeros,) * 5))
  return saved[0], (kernels, masks, steps, saved)


def _backward(dtype, residuals, grad_states):
  kernels, masks, steps, (states, r, z, n, hidden_n) = residuals
  (u_r, u_z, u_n), (m_r, m_z, m_n) = kernels, masks
  previous = jnp.concatenate([jnp.zeros_like(states[:1]), states[:-1]])
  zeros = jnp.zeros(states.shape, jnp.float32)

  def step(i, carry):
    t = steps - 1 - i
    grad_state, saved = carry
    grad = grad_state + grad_states[t]
    grad_n = grad * (1 - z[t]) * (1 - n[t] ** 2)
    grad_hidden_n = grad_n * r[t]
    grad_r = grad_n * hidden_n[t] * r[t] * (1 - r[t])
    grad_z = grad * (previous[t] - n[t]) * z[t] * (1 - z[t])
    grad_state = (grad * z[t] + _matmul(grad_r, u_r.T, dtype) * m_r + _matmul(grad_z, u_z.T, dtype) * m_z
                  + _matmul(grad_hidden_n, u_n.T, dtype) * m_n)
    return grad_state, tuple(buffer.at[t].set(value)
                             for buffer, value in zip(saved, (grad_r, grad_z, grad_n, grad_hidden_n)))

  _, (grad_r, grad_z, grad_n, grad_hidden_n) = jax.lax.fori_loop(
      0, steps, step, (zeros[0], (zeros,) * 4))
  kernel_grad = lambda mask, grad: jnp.einsum("tbk,tbh->kh", previous * mask, grad).astype(u_r.dtype)
  grad_kernels = (kernel_grad(m_r, grad_r), kernel_grad(m_z, grad_z), kernel_grad(m_n, grad_hidden_n))
  return (grad_r, grad_z, grad_n), grad_kernels, jax.tree.map(jnp.zeros_like, masks), None


gru_states.defvjp(_forward, _backward)
