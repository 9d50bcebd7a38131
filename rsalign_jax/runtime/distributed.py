"""Multi-process start-up: `jax.distributed.initialize` when the job spans processes, a no-op otherwise.

Must run before any other JAX call (`rsalign_jax.main` calls it first). Three ways to get a multi-process job:
explicit arguments (`--coordinator_address=host:port --num_processes=N --process_id=i`, as
`launch/local_multiprocess.sh` passes them), or JAX's own cluster detection on SLURM (`srun`, one task per GPU or
per node) and on Cloud TPU pod slices, which `initialize()` with no arguments reads from the environment.
"""
import glob
import os

import jax

MODES = ("auto", "on", "off")
_TPU_POD_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")


def _slurm_multi_task():
  return "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def _cloud_tpu():
  """A TPU pod's worker list in the environment, or a TPU VM's chips (/dev/accel*). Newer TPU VMs expose chips
  through vfio only and set no variable: `launch/tpu_pod.sh` passes `--distributed=on` for them."""
  return any(name in os.environ for name in _TPU_POD_ENV) or bool(glob.glob("/dev/accel*"))


def should_initialize(mode="auto", coordinator_address=None, num_processes=None, process_id=None):
  """'on': always; 'off': never; 'auto': when arguments are given or a SLURM multi-task job / Cloud TPU VM is seen."""
  if mode not in MODES:
    raise ValueError(f"distributed={mode!r}: expected one of {MODES}")
  if mode != "auto":
    return mode == "on"
  explicit = any(a is not None for a in (coordinator_address, num_processes, process_id))
  return explicit or _slurm_multi_task() or _cloud_tpu()


def initialize(coordinator_address=None, num_processes=None, process_id=None, mode="auto"):
  """Joins the distributed JAX system if the job spans processes; returns whether it did.

  Arguments left as None are auto-detected by JAX (SLURM, Cloud TPU, ...). With explicit arguments all three must be
  given, as every process needs the coordinator, the process count and its own id.
  """
  explicit = [coordinator_address, num_processes, process_id]
  if any(a is not None for a in explicit) and any(a is None for a in explicit):
    raise ValueError("--coordinator_address, --num_processes and --process_id go together: give all three or none")
  if not should_initialize(mode, coordinator_address, num_processes, process_id):
    return False
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  return True
