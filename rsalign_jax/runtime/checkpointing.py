"""Orbax checkpoints of the train state, the input-pipeline position and small JSON metadata.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save never
leaves a half-written checkpoint that a restart would pick up.
"""
import json
import os

import jax
import orbax.checkpoint as ocp


def newest_step(directory):
  """The largest step of `directory`'s completed checkpoints (its digit-named subdirectories; orbax renames a step
  to its number only once written), or None."""
  steps = [int(name) for name in os.listdir(directory) if name.isdigit()] if os.path.isdir(directory) else []
  return max(steps) if steps else None


class Checkpointer:
  """Saves/restores {state, loader, meta} under one directory, keeping the newest `keep` steps.

  Processes agree that an async save finished through a barrier named after the step; the directory's name
  prefixes it, so two checkpointers saving the same step at once (the trainer's latest and best) do not collide.
  """

  def __init__(self, directory, keep=2):
    # Orbax's replica-parallel save splits each replicated array among the devices holding it: one compiled slice
    # per array shape and device (seconds at a run's first save on CPU), which pays only when the replicas sit on
    # different hosts.
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1), override=True)
    barrier_prefix = os.path.basename(os.path.normpath(directory))
    multiprocessing = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=barrier_prefix)
    # Naming each item's handler lets a fresh manager read a checkpoint's items (without, orbax warns per item).
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
                "loader": ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(directory, item_handlers=handlers, options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, multiprocessing_options=multiprocessing))

  def latest_step(self):
    return self._manager.latest_step()

  def save(self, step, state, *, loader_state=None, meta=None):
    """Saves `step`, replacing a checkpoint of the same step (a run killed after saving it redoes the step)."""
    if step in self._manager.all_steps():
      self._manager.delete(step)
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
    if loader_state is not None:
      items["loader"] = ocp.args.JsonSave(json.loads(loader_state))
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state, step=None):
    """Returns (state laid out as `abstract_state`'s shardings, loader state bytes or None, meta dict)."""
    step = self.latest_step() if step is None else step
    names = self._manager.item_metadata(step).keys()
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if "loader" in names:
      items["loader"] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    loader_state = json.dumps(restored["loader"]).encode() if "loader" in names else None
    return restored["state"], loader_state, restored["meta"]

  def wait_until_finished(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()
