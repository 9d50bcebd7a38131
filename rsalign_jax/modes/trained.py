"""Restoring a trained state for the load-only modes (`main --mode=eval|export|search`).

`load` restores the checkpoint the trainer tests (`workdir/best` if `config.test_on_best` and it holds a
checkpoint, else the newest of `workdir/checkpoints`) or one the user names, with the shardings of
`experiment.build_setup`, so evaluation, export and search see exactly the state the trainer's test numbers come from.
"""
import dataclasses
import os

from rsalign_jax import experiment
from rsalign_jax.runtime import checkpointing
from rsalign_jax.runtime import sharding as sharding_lib

CHECKPOINT_CHOICES = ("", "best", "last")


@dataclasses.dataclass
class Trained:
  """A restored train state with the setup that built it."""
  setup: experiment.Setup
  state: experiment.TrainState
  checkpoint: str  # as the trainer's results.json names it: "best val (step N)" or "last"; or the path given
  step: int

  @property
  def config(self):
    return self.setup.config

  @property
  def variables(self):
    return experiment.model_variables(self.state)


def make_mesh(config):
  """The trainer's mesh for `config`."""
  return sharding_lib.make_mesh(fsdp=config.sharding.fsdp)


def find_checkpoint(config, workdir, checkpoint=""):
  """(checkpoint directory, step, description) of the checkpoint to load.

  checkpoint: '' = the one the trainer tests; 'best' / 'last' = workdir/best / the newest of workdir/checkpoints;
  otherwise a path: a checkpoint directory (such as WORKDIR/best) or one step of it (such as WORKDIR/checkpoints/400).
  """
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"--workdir={workdir}: no such directory; train first with --mode=train")
  if checkpoint not in CHECKPOINT_CHOICES:
    return _checkpoint_path(checkpoint)
  best = checkpointing.newest_step(os.path.join(workdir, "best"))
  if checkpoint == "best" or (not checkpoint and config.test_on_best and best is not None):
    if best is None:
      raise FileNotFoundError(f"--checkpoint=best: {workdir}/best holds no checkpoint (no validation has run)")
    return os.path.join(workdir, "best"), best, f"best val (step {best})"
  last = checkpointing.newest_step(os.path.join(workdir, "checkpoints"))
  if last is None:
    raise FileNotFoundError(f"--workdir={workdir}: no checkpoint in {workdir}/checkpoints or {workdir}/best; train "
                            "first with --mode=train")
  return os.path.join(workdir, "checkpoints"), last, "last"


def _checkpoint_path(path):
  path = os.path.abspath(path)
  if os.path.basename(path).isdigit() and os.path.isdir(path):
    return os.path.dirname(path), int(os.path.basename(path)), path
  step = checkpointing.newest_step(path)
  if step is None:
    raise FileNotFoundError(f"--checkpoint={path}: expected 'best', 'last', a checkpoint directory (such as "
                            "WORKDIR/best) or one of its step directories (such as WORKDIR/checkpoints/400)")
  return path, step, path


def load(config, workdir, checkpoint=""):
  """Restores the chosen checkpoint of `workdir` (see `find_checkpoint`) onto the trainer's mesh."""
  workdir = os.path.abspath(workdir)  # orbax needs absolute paths
  directory, step, description = find_checkpoint(config, workdir, checkpoint)
  setup = experiment.build_setup(config, workdir, make_mesh(config), training=False)
  checkpointer = checkpointing.Checkpointer(directory)
  try:
    state, _, _ = checkpointer.restore(setup.abstract_state, step=step)
  finally:
    checkpointer.close()
  return Trained(setup, state, description, int(state.step))
