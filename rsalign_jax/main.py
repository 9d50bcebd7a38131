"""Command line entry point: `python -m rsalign_jax.main --config=configs/hvsa.py[:arg] --workdir=DIR`.

Intentionally thin (as in the flax examples): flags, then `train.train_and_evaluate`, which is importable and tested.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from rsalign_jax import train
from rsalign_jax.runtime import metric_writer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally `file.py:arg`.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  metric_writer.quiet_library_info_logs()
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
