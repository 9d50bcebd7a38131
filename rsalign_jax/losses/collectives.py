"""Pairwise losses over a batch sharded on the mesh's batch axes: one all-gather, or a `ppermute` ring.

Every pairwise loss here is written once as `block(rows, cols) -> (row_stats, col_stats)` on one block of its
(B, B) pair matrix, rows = this device's b = B/n examples, cols = some examples of the batch (dicts of arrays with
a leading example axis). Stats are reductions that merge exactly from partial blocks: `Sum`, `LogSumExp` (the
stable column softmax of row-sharded logits) and `Hardest` (a max whose gradient is split
evenly over ties, like `jnp.max`, however the ties fall across blocks and devices). `pairwise_stats` reduces a
device's rows against all B columns and returns the row stats of its rows and the column stats of its columns:

* 'gather': all-gather the columns, one (b, B) block; column stats are merged across devices by a reduce-scatter
  (`pmax` on stop-gradient inputs, since `pmax` has no derivative). Per-device pair memory O(b B).
* 'ring': the columns travel around the devices by `ppermute` (open_clip's SigLIP "shift", the SigLIP paper's
  chunked loss) with their column stats riding along; after n hops they are home, complete. Each (b, b) block is
  under `jax.checkpoint`, so backward keeps only the inputs of a block: pair memory O(b^2), not O(b B). All n
  blocks run in one `lax.scan` from stats that merge as the identity (`EMPTY`), so XLA reuses one set of pair
  buffers (peeling the first block off the loop cost up to 1.8x the memory on XLA:CPU).

`block_size` further splits each block's columns into `jax.checkpoint`-ed chunks scanned in sequence: pair memory
O(b block_size). Gradients flow through the collectives' transposes (reduce-scatter for all-gather, the reverse
ring for ppermute), so the sharded losses are exact in value and gradient.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from rsalign_jax.mesh_axes import BATCH_AXES

IMPLS = ("global", "gather", "ring")


def _local_block(x, axis_name):
  """This device's b entries of a B-vector that every device holds."""
  size = x.shape[0] // lax.axis_size(axis_name)
  return lax.dynamic_slice_in_dim(x, lax.axis_index(axis_name) * size, size)


def _scatter_sum(x, axis_name):
  return lax.psum_scatter(x, axis_name, tiled=True)


class Sum(NamedTuple):
  """A sum; its partial sums add."""
  value: jax.Array
  EMPTY = (0.0,)  # the merge identity, field by field

  def merge(self, other):
    return Sum(self.value + other.value)

  def reduce_scatter(self, axis_name):
    return Sum(_scatter_sum(self.value, axis_name))

  def result(self):
    return self.value


class LogSumExp(NamedTuple):
  """log sum exp x, kept as (shift, sum exp(x - shift)) so that partial results rescale to a common shift."""
  shift: jax.Array  # gradient-free; the result does not depend on it
  scaled_sum: jax.Array  # sum of exp(x - shift)
  EMPTY = (-jnp.inf, 0.0)

  @classmethod
  def over(cls, x, axis):
    shift = jnp.max(lax.stop_gradient(x), axis=axis)
    return cls(shift, jnp.sum(jnp.exp(x - jnp.expand_dims(shift, axis)), axis=axis))

  def merge(self, other):
    shift = jnp.maximum(self.shift, other.shift)
    return LogSumExp(shift, self.scaled_sum * jnp.exp(self.shift - shift)
                     + other.scaled_sum * jnp.exp(other.shift - shift))

  def reduce_scatter(self, axis_name):
    shift = lax.pmax(self.shift, axis_name)
    return LogSumExp(_local_block(shift, axis_name),
                     _scatter_sum(self.scaled_sum * jnp.exp(self.shift - shift), axis_name))

  def result(self):
    return self.shift + jnp.log(self.scaled_sum)


class Hardest(NamedTuple):
  """max over x, as the mean of the entries equal to the max: the value of `jnp.max` and its tie-splitting gradient."""
  max: jax.Array  # gradient-free
  tied_sum: jax.Array
  ties: jax.Array
  EMPTY = (-jnp.inf, 0.0, 0.0)

  @classmethod
  def over(cls, x, axis):
    top = jnp.max(lax.stop_gradient(x), axis=axis)
    tied = x == jnp.expand_dims(top, axis)
    return cls(top, jnp.sum(jnp.where(tied, x, 0.0), axis=axis), jnp.sum(tied, axis=axis, dtype=x.dtype))

  def _keep_if_top(self, top):
    tied = self.max == top
    return jnp.where(tied, self.tied_sum, 0.0), jnp.where(tied, self.ties, 0.0)

  def merge(self, other):
    top = jnp.maximum(self.max, other.max)
    (sum_a, ties_a), (sum_b, ties_b) = self._keep_if_top(top), other._keep_if_top(top)
    return Hardest(top, sum_a + sum_b, ties_a + ties_b)

  def reduce_scatter(self, axis_name):
    top = lax.pmax(self.max, axis_name)
    tied_sum, ties = self._keep_if_top(top)
    return Hardest(_local_block(top, axis_name), _scatter_sum(tied_sum, axis_name), _scatter_sum(ties, axis_name))

  def result(self):
    return self.tied_sum / self.ties


def _is_stat(x):
  return isinstance(x, (Sum, LogSumExp, Hardest))


def _map_stats(fn, *stats):
  return jax.tree.map(fn, *stats, is_leaf=_is_stat)


def _merge(a, b):
  return _map_stats(lambda x, y: x.merge(y), a, b)


def results(stats):
  """The reduced values of a pytree of stats."""
  return _map_stats(lambda s: s.result(), stats)


def _empty_like(shapes, axis_name):
  """Stats that merge as the identity, shaped like `shapes` (and varying over devices, like what they start)."""
  def empty(stat):
    return type(stat)(*(lax.pcast(jnp.full(field.shape, fill, field.dtype), axis_name, to="varying")
                        for field, fill in zip(stat, stat.EMPTY)))
  return _map_stats(empty, shapes)


def _num_examples(tree):
  return jax.tree.leaves(tree)[0].shape[0]


def _reduce_columns(block, rows, cols, block_size, remat, axis_name):
  """`block` over all of `cols`, `block_size` columns at a time, each chunk rematerialised in backward."""
  n_cols = _num_examples(cols)
  if block_size is None or block_size >= n_cols:
    return (jax.checkpoint(block, prevent_cse=False) if remat else block)(rows, cols)
  if n_cols % block_size:
    raise ValueError(f"block_size {block_size} must divide the {n_cols} columns of a block")
  chunks = jax.tree.map(lambda x: x.reshape(n_cols // block_size, block_size, *x.shape[1:]), cols)
  block = jax.checkpoint(block, prevent_cse=False)
  first_chunk = jax.tree.map(lambda x: x[0], chunks)
  row_stats, _ = _empty_like(jax.eval_shape(block, rows, first_chunk), axis_name)

  def step(row_stats, chunk):
    new_row_stats, col_stats = block(rows, chunk)
    return _merge(row_stats, new_row_stats), col_stats

  row_stats, col_stats = lax.scan(step, row_stats, chunks)
  return row_stats, jax.tree.map(lambda x: x.reshape(n_cols, *x.shape[2:]), col_stats)


def _gather(block, rows, cols, axis_name, block_size):
  all_cols = lax.all_gather(cols, axis_name, tiled=True)
  row_stats, col_stats = _reduce_columns(block, rows, all_cols, block_size, False, axis_name)
  return row_stats, _map_stats(lambda s: s.reduce_scatter(axis_name), col_stats)


def _ring(block, rows, cols, axis_name, block_size):
  n = lax.axis_size(axis_name)
  to_next = functools.partial(lax.ppermute, axis_name=axis_name, perm=[(i, (i + 1) % n) for i in range(n)])
  reduce_columns = functools.partial(_reduce_columns, block, rows, block_size=block_size, remat=True,
                                     axis_name=axis_name)
  row_stats, col_stats = _empty_like(jax.eval_shape(reduce_columns, cols), axis_name)

  def hop(carry, _):
    row_stats, visiting, col_stats = carry
    new_row_stats, new_col_stats = reduce_columns(visiting)
    return (_merge(row_stats, new_row_stats), *to_next((visiting, _merge(col_stats, new_col_stats)))), None

  (row_stats, _, col_stats), _ = lax.scan(hop, (row_stats, cols, col_stats), length=n)
  return row_stats, col_stats


def pairwise_stats(block, rows, cols, *, impl, block_size=None, axis_name=BATCH_AXES):
  """Inside shard_map: (stats of each local row over all B columns, stats of each local column over all B rows)."""
  if impl == "gather":
    return _gather(block, rows, cols, axis_name, block_size)
  if impl == "ring":
    return _ring(block, rows, cols, axis_name, block_size)
  raise ValueError(f"pairwise_stats runs the sharded impls 'gather' and 'ring', got {impl!r}")


def global_positions(n_local, axis_name=BATCH_AXES):
  """Batch positions of this device's rows."""
  return lax.axis_index(axis_name) * n_local + jnp.arange(n_local)


def batch_ids(ids, n):
  """Example ids (equal ids = same image, hence positives); None: every example its own id."""
  return jnp.arange(n) if ids is None else jnp.asarray(ids)


def over_batch(reference, per_device, batch, shared=(), *, impl, mesh, block_size=None):
  """A loss by `impl`: 'global' = `reference(*batch, *shared)` on global arrays (XLA partitions it under jit);
  'gather' / 'ring' = `per_device(stats, *batch_shard, *shared)` under shard_map with `batch` split by rows over
  the batch axes, `stats` being `pairwise_stats` for that impl. `per_device` returns the psum-ed loss."""
  if impl not in IMPLS:
    raise ValueError(f"loss impl {impl!r}: expected one of {IMPLS}")
  if impl == "global":
    return reference(*batch, *shared)
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()  # the trainer runs its step under `jax.set_mesh`
  if mesh.empty:
    raise ValueError(f"loss impl {impl!r} needs the device mesh (pass mesh= or call under jax.set_mesh)")
  stats = functools.partial(pairwise_stats, impl=impl, block_size=block_size)
  sharded = jax.shard_map(lambda batch, shared: per_device(stats, *batch, *shared), mesh=mesh,
                          in_specs=(P(BATCH_AXES), P()), out_specs=P())
  return sharded(tuple(batch), tuple(shared))
