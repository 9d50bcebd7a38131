"""Preemption notices (SIGTERM): the trainer finishes its step, checkpoints it and stops.

Schedulers (SLURM, Kubernetes, GCE/Cloud TPU maintenance) send SIGTERM some seconds before killing a job. Every
process must stop at the same step, since the checkpoint save is collective. With several processes JAX's
preemption sync service (started by `jax.distributed.initialize`) catches SIGTERM on any process and agrees on the
step; in a single process a signal handler sets a flag that the train loop reads after each step (SIGTERM before
the train loop starts still ends the process at once: there is nothing new to save).
"""
import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
  """`reached(step)` is True once a preemption notice has arrived, at the same step on every process."""

  def __init__(self):
    self._notified = False
    self._previous_handler = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():  # where Python allows it
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._notified = True

  def reached(self, step):
    """Call once per step, with the step just completed, on every process."""
    if jax.process_count() == 1:
      return self._notified
    return multihost_utils.reached_preemption_sync_point(step)

  def close(self):
    """Restores the SIGTERM handler that was in place before."""
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None
