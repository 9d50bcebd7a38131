"""A trained workdir's parameters as an `init` entry: start a run from another run's trained state.

  config.init.trained_model = dict(format="trained.load", checkpoint=WORKDIR, into="params/model", subtree="model")
  config.init.trained_objective = dict(format="trained.load", checkpoint=WORKDIR, into="params/objective",
                                       subtree="objective")

fill every parameter the workdir's tested checkpoint holds (`WORKDIR/best`'s newest step, else the newest of
`WORKDIR/checkpoints`, or a step directory given as the path) into the new run's initial state: for example heads
trained on frozen, cached trunks, before the trunks are fine-tuned under them (linear probing then fine-tuning).
Parameters the new model has and the checkpoint lacks (the unfrozen trunk) keep their other `init` entries' or
random values; a checkpoint parameter the new model lacks, or holds at another shape, is an error.
"""
import os

import numpy as np
import orbax.checkpoint as ocp

from rsalign_jax.runtime import checkpointing
from rsalign_jax.weights import common

COLLECTIONS = ("params", "batch_stats")


def checkpoint_step_dir(path: str) -> str:
  """The step directory `load` reads for `path` (a workdir, a checkpoint directory or one of its steps)."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(os.path.join(path, "state")):
    return path
  for directory in (os.path.join(path, "best"), os.path.join(path, "checkpoints"), path):
    step = checkpointing.newest_step(directory)
    if step is not None:
      return os.path.join(directory, str(step))
  raise FileNotFoundError(f"{path}: no trained checkpoint (expected a workdir with best/ or checkpoints/ steps, or a "
                          "step directory holding state/)")


def parameter_paths(checkpoint: str, collection: str = "params", subtree: str = "") -> list[str]:
  """The paths `load` returns, read from the checkpoint's metadata (no array is read)."""
  step_dir = checkpoint_step_dir(checkpoint)
  tree = ocp.StandardCheckpointer().metadata(os.path.join(step_dir, "state")).item_metadata
  return sorted(_select(step_dir, tree, collection, subtree))


def load(checkpoint: str, expected=None, collection: str = "params", subtree: str = "") -> dict[str, np.ndarray]:
  """{path: array} of the checkpoint's `collection` ('params' or 'batch_stats'), its '/'-path `subtree` ('' for all
  of it), checked against `expected`."""
  step_dir = checkpoint_step_dir(checkpoint)
  state = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
  flat = {path: np.asarray(value) for path, value in _select(step_dir, state, collection, subtree).items()}
  if expected is not None:
    wanted = {path: tuple(leaf.shape) for path, leaf in common.flatten(expected).items()}
    absent = sorted(set(flat) - set(wanted))
    reshaped = sorted(p for p in set(flat) & set(wanted) if tuple(flat[p].shape) != wanted[p])
    if absent or reshaped:
      raise common.WeightsMismatchError(
          f"{step_dir}: {collection} not in the model: {absent[:5]}; at other shapes: "
          f"{[(p, flat[p].shape, wanted[p]) for p in reshaped[:5]]}")
  return flat


def _select(step_dir, state, collection, subtree):
  """{path below `subtree`: leaf} of the restored (or metadata) `state`'s `collection`."""
  if collection not in COLLECTIONS:
    raise ValueError(f"trained.load collection={collection!r}: expected one of {COLLECTIONS}")
  prefix = f"{subtree}/" if subtree else ""
  selected = {path[len(prefix):]: leaf for path, leaf in common.flatten(state.get(collection) or {}).items()
              if path.startswith(prefix)}
  if not selected:
    raise common.WeightsMismatchError(f"{step_dir}: no {collection} under {subtree!r}")
  return selected
