"""Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"):
the exact gradient of a batch-level loss at a global batch whose activations do not fit in memory at once.

A contrastive loss couples every example with every other, so plain gradient accumulation (each chunk's loss over
its own in-chunk negatives, gradients averaged) optimises a different, smaller-batch loss. GradCache splits the
step at the embeddings instead: (1) embed the batch chunk by chunk, keeping only the embeddings; (2) evaluate the
loss on all of them and take its gradient w.r.t. the embeddings (and the loss's own parameters); (3) re-run each
chunk's forward under `jax.vjp` and pull back that chunk's embedding gradient, summing parameter gradients. Peak
activation memory is one chunk's, at the cost of a second forward pass; the result is the full-batch gradient.

Exactness holds for models whose embedding of an example depends on that example alone. Dropout is (each chunk
gets `fold_in(rng, chunk)` in both passes). BatchNorm in train mode is not: its statistics become per-chunk, as
with per-device BN in data parallelism, so the gradient is that of the chunked-BN model (BN in eval mode is exact).

Chunk k holds rows k, k + n, k + 2n, ... of the batch (n = B / chunk_size chunks): a batch sharded in contiguous
blocks over the devices then gives chunks that are sharded the same way (when the device count divides
chunk_size), so every device works on every chunk.
"""
import jax
import jax.numpy as jnp
from jax import lax


def _to_chunks(x, num_chunks):
  """(B, ...) -> (num_chunks, B / num_chunks, ...), chunk k = rows k, k + num_chunks, ..."""
  return jnp.swapaxes(x.reshape((x.shape[0] // num_chunks, num_chunks) + x.shape[1:]), 0, 1)


def _from_chunks(x):
  """Inverse of `_to_chunks`."""
  return jnp.swapaxes(x, 0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def gradcache_value_and_grad(embed_fn, loss_fn, params, batch, *, chunk_size, rng):
  """`jax.value_and_grad(..., has_aux=True)` of loss_fn(embed_fn(batch)) computed by gradient caching.

  Args:
    embed_fn: (model_params, chunk, rng) -> (embeddings, state): a pytree of (chunk_size, ...) per-example arrays
      and a float pytree (e.g. updated BN `batch_stats`, or {}) that is averaged over the chunks.
    loss_fn: (objective_params, embeddings, batch) -> (loss, aux) on the whole batch's embeddings.
    params: {"model": model_params, "objective": objective_params} (`experiment.TrainState.params`; either may be {}).
    batch: pytree of (B, ...) arrays; chunked for embed_fn, whole for loss_fn.
    chunk_size: examples per forward/backward chunk; must divide B.
    rng: PRNG key; chunk k uses `fold_in(rng, k)` in both of its passes.

  Returns:
    ((loss, (aux, state)), grads), grads shaped like `params`, as `jax.value_and_grad` of the full-batch loss.
  """
  sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
  if len(sizes) != 1:
    raise ValueError(f"batch leaves have different leading sizes {sorted(sizes)}")
  (batch_size,) = sizes
  if chunk_size <= 0 or batch_size % chunk_size:
    raise ValueError(f"chunk_size={chunk_size} must be a positive divisor of the batch size {batch_size}")
  num_chunks = batch_size // chunk_size
  chunks = jax.tree.map(lambda x: _to_chunks(x, num_chunks), batch)
  chunk_rngs = jax.vmap(lambda k: jax.random.fold_in(rng, k))(jnp.arange(num_chunks))

  # (1) Forward only: nothing is differentiated, so no chunk's activations outlive its iteration.
  chunked_embeddings, chunked_state = lax.map(lambda a: embed_fn(params["model"], *a), (chunks, chunk_rngs))
  embeddings = jax.tree.map(_from_chunks, chunked_embeddings)
  state = jax.tree.map(lambda x: jnp.mean(x, axis=0), chunked_state)

  # (2) The full-batch loss and its gradient w.r.t. the embeddings and the loss's own parameters.
  (loss, aux), (objective_grads, embedding_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
      params["objective"], embeddings, batch)

  # (3) Backward chunk by chunk: recompute the chunk's forward and pull back its embedding cotangents.
  def backward(model_grads, inputs):
    chunk, chunk_rng, cotangents = inputs
    _, pullback, _ = jax.vjp(lambda p: embed_fn(p, chunk, chunk_rng), params["model"], has_aux=True)
    (grads,) = pullback(cotangents)
    return jax.tree.map(jnp.add, model_grads, grads), None

  chunked_cotangents = jax.tree.map(lambda x: _to_chunks(x, num_chunks), embedding_grads)
  model_grads, _ = lax.scan(backward, jax.tree.map(jnp.zeros_like, params["model"]),
                            (chunks, chunk_rngs, chunked_cotangents))
  return (loss, (aux, state)), {"model": model_grads, "objective": objective_grads}
