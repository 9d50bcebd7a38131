"""The device mesh, the shardings of batches and of the train state, and moving host batches onto the mesh.

The mesh is 2-D, ('data', 'fsdp'). Batches are split over both axes together (`BATCH_AXES`), so every device holds
B / n examples whatever the split; the 'fsdp' axis (size 1 unless `config.sharding.fsdp` says otherwise) also shards
large parameters and their optimizer state (ZeRO-3 / FSDP style): XLA all-gathers a parameter where a computation
needs it whole and reduce-scatters its gradient, so per-device parameter memory falls by the fsdp factor.
"""
import collections
import re
import threading

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rsalign_jax.mesh_axes import BATCH_AXES, FSDP_AXIS


def make_mesh(fsdp=1):
  """A (devices / fsdp, fsdp) mesh over every device of every process (Auto axes: XLA inserts the collectives)."""
  devices = np.asarray(jax.devices())
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"sharding.fsdp={fsdp} must be a positive divisor of the {len(devices)} devices")
  return Mesh(devices.reshape(-1, fsdp), BATCH_AXES)


def batch_sharding(mesh):
  """Leading (batch) axis split over all devices ('data' x 'fsdp'), everything else replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh):
  return NamedSharding(mesh, P())


def fsdp_spec(shape, fsdp_size):
  """P() or a spec sharding the largest dimension divisible by `fsdp_size` over 'fsdp' (replicated if none is)."""
  dims = [d for d in np.argsort(shape, kind="stable")[::-1] if shape[d] % fsdp_size == 0]
  if fsdp_size == 1 or not dims:
    return P()
  spec = [None] * len(shape)
  spec[dims[0]] = FSDP_AXIS
  return P(*spec)


def path_name(path):
  """A pytree key path as the '/'-joined names config regexes match ('params/model/image_encoder/kernel')."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def state_shardings(abstract_state, mesh, *, patterns=(), min_size=0):
  """Shardings of a train state: leaves whose '/'-joined path matches a regex in `patterns` (e.g. 'model/.*',
  which also matches that parameter's optimizer moments) and with at least `min_size` elements are sharded over
  'fsdp' by `fsdp_spec`; every other leaf is replicated."""
  fsdp_size = mesh.shape[FSDP_AXIS]
  compiled = [re.compile(p) for p in patterns]

  def sharding(path, leaf):
    name = path_name(path)
    if leaf.size >= max(min_size, 1) and any(p.search(name) for p in compiled):
      return NamedSharding(mesh, fsdp_spec(leaf.shape, fsdp_size))
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(sharding, abstract_state)


def to_global(local_batch, sharding):
  """This process's rows of a batch (numpy pytree) -> one globally sharded jax.Array per leaf."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def pad_rows(array, rows):
  """A numpy array of at most `rows` rows with zero rows appended to exactly `rows` (one compiled function then
  serves a split's last, short batch)."""
  array = np.asarray(array)
  return np.concatenate([array, np.zeros((rows - len(array),) + array.shape[1:], array.dtype)])


def padded_global_batch(arrays, rows, sharding):
  """A batch every process holds whole (numpy pytree, at most `rows` rows) as a global batch of exactly `rows` rows:
  zero rows appended (one compiled function serves a split's last, short batch), each process giving its slice."""
  count = jax.process_count()

  def local(array):
    share = rows // count
    return pad_rows(array, rows)[jax.process_index() * share:(jax.process_index() + 1) * share]

  return to_global(jax.tree.map(local, arrays), sharding)


class DevicePrefetcher:
  """Keeps `size` global batches on the devices ahead of the consumer, tracking the loader state per batch.

  `state` is the loader state right after the last batch handed out, so a checkpoint taken between steps resumes
  at exactly the next unconsumed batch however far the prefetch thread has read ahead.
  """

  def __init__(self, loader_iterator, sharding, size=2):
    self._iterator = loader_iterator
    self._sharding = sharding
    self._queue = collections.deque()
    self._size = size
    self._cond = threading.Condition()
    self._error = None
    self._stopped = False
    self.state = loader_iterator.get_state()
    self._thread = threading.Thread(target=self._fill, daemon=True)
    self._thread.start()

  def _fill(self):
    try:
      while True:
        with self._cond:
          self._cond.wait_for(lambda: self._stopped or len(self._queue) < self._size)
          if self._stopped:
            return
        batch = next(self._iterator)
        item = (to_global(batch, self._sharding), self._iterator.get_state())
        with self._cond:
          self._queue.append(item)
          self._cond.notify_all()
    except BaseException as e:  # surfaced to the consumer
      with self._cond:
        self._error = e
        self._cond.notify_all()

  def __iter__(self):
    return self

  def __next__(self):
    with self._cond:
      self._cond.wait_for(lambda: self._queue or self._error is not None)
      if not self._queue:
        raise self._error
      batch, self.state = self._queue.popleft()
      self._cond.notify_all()
    return batch

  def close(self):
    with self._cond:
      self._stopped = True
      self._cond.notify_all()
    self._thread.join(timeout=10)
