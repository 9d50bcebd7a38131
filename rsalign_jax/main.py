"""Command line entry point: `python -m rsalign_jax.main --config=configs/hvsa.py[:arg] --workdir=DIR`.

Intentionally thin (as in the flax examples): flags, then `train.train_and_evaluate`, which is importable and tested.
Multi-process jobs join the distributed system first (`runtime.distributed`), before any other JAX call.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from rsalign_jax import train
from rsalign_jax.runtime import distributed
from rsalign_jax.runtime import metric_writer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally `file.py:arg`.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", distributed.MODES,
    "auto: join a multi-process job when the flags below are given or SLURM / Cloud TPU is detected; on: always "
    "(JAX auto-detects what the flags leave out); off: single process.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, e.g. 127.0.0.1:12345.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, mode=_DISTRIBUTED.value)
  metric_writer.quiet_library_info_logs()
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
