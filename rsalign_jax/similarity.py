"""Vector similarities shared by the models' scores and the losses: precision, normalisation and the papers' cosine
(docs/METHODS.md §1.7). Pure jnp, importing nothing from the package: models and losses need not import each other.
"""
import jax
import jax.numpy as jnp


def upcast(x):
  """Towers may run in bf16; losses compute in float32 (or float64 when given float64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def l2_normalize(x, eps=1e-12):
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def pairwise_dot(a, b):
  """<a_i, b_j> for all pairs as one full-precision matmul (rankings must not depend on TF32)."""
  return jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)


def cosine_similarity(a, b, eps=1e-8):
  """S_ij = <a_i, b_j> / max(||a_i|| ||b_j||, eps) for all pairs."""
  a, b = upcast(a), upcast(b)
  norms = jnp.linalg.norm(a, axis=-1)[:, None] * jnp.linalg.norm(b, axis=-1)[None, :]
  return pairwise_dot(a, b) / jnp.maximum(norms, eps)


def unit_cosine_similarity(a, b):
  """The cosine as <a^_i, b^_j> of the L2-normalised rows: what the losses score pairs by.

  Equal to `cosine_similarity` up to rounding (and for zero rows: 0), but without its (B, B) product of norms,
  which in a loss's backward costs pair-sized buffers (a quarter of a ring block's memory on XLA:CPU).
  """
  return pairwise_dot(l2_normalize(upcast(a)), l2_normalize(upcast(b)))


def paired_unit_cosine_similarity(a, b):
  """<a^_i, b^_i>: the diagonal of `unit_cosine_similarity` without the matrix."""
  return jnp.sum(l2_normalize(upcast(a)) * l2_normalize(upcast(b)), axis=-1)
