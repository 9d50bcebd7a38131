"""Shared numerics of the losses: precision, normalisation and the papers' cosine similarity (METHODS 1.7)."""
import jax
import jax.numpy as jnp


def upcast(x):
  """Towers may run in bf16; losses compute in float32 (or float64 when given float64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def l2_normalize(x, eps=1e-12):
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def cosine_similarity(a, b, eps=1e-8):
  """S_ij = <a_i, b_j> / max(||a_i|| ||b_j||, eps), one full-precision matmul (rankings must not depend on TF32)."""
  a, b = upcast(a), upcast(b)
  norms = jnp.linalg.norm(a, axis=-1)[:, None] * jnp.linalg.norm(b, axis=-1)[None, :]
  return jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST) / jnp.maximum(norms, eps)
