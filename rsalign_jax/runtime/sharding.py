"""The device mesh and moving host batches onto it as global arrays."""
import collections
import threading

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh():
  """A 1-D ('data',) mesh over every device of every process (Auto axis type: XLA inserts the collectives)."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh):
  """Leading (batch) axis split over 'data', everything else replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh):
  return NamedSharding(mesh, P())


def to_global(local_batch, sharding):
  """This process's rows of a batch (numpy pytree) -> one globally sharded jax.Array per leaf."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


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
