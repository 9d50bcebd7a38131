"""Data-parallel scaling of the HVSA train step at a fixed per-device batch, on 1, 2, 4, 8 virtual CPU devices.

  python benchmarks/scaling.py --devices=1,2,4,8 --per_device_batch=16

For each device count N (one subprocess each, since XLA fixes the device count per process via
`--xla_force_host_platform_device_count=N`), jits `train.train_step` of `configs/hvsa.py`'s default config on a
global batch of N x per_device_batch random 80 px images sharded over the trainer's ('data', 'fsdp') mesh (shape
N x 1: fsdp 1, pure data parallelism), and prints a markdown table of images/s and XLA's per-device temporary memory
of the compiled step (`memory_analysis().temp_size_in_bytes`).

On a CPU host the N virtual devices share the same cores (2 on this project's machine), so images/s cannot grow
with N: the table shows the sharding overhead (collectives, the (B, B) loss growing with the global batch) and
that per-device memory stays roughly flat at a fixed per-device batch, which is what lets real accelerators scale.
"""
import json
import os
import subprocess
import sys

from absl import app
from absl import flags

_DEVICES = flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Device counts; one int runs in this process.")
_PER_DEVICE_BATCH = flags.DEFINE_integer("per_device_batch", 16, "Examples per device.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 80, "Image side in pixels.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps after one warm-up step.")
_CHILD = flags.DEFINE_bool("child", False, "Internal: measure this process's devices and print one JSON line.")


def measure(per_device_batch, image_size, steps):
  """{devices, global_batch, compile_s, s_per_step, images_per_s, temp_mib} of this process's devices."""
  import jax  # imported here: the parent process must not initialise a backend before setting XLA_FLAGS
  import timing

  config = timing.load_config("hvsa")
  config.input.batch_size = per_device_batch * jax.device_count()
  return {"devices": jax.device_count(), "global_batch": config.input.batch_size,
          **timing.time_train_step(config, image_size, steps)}


def run_subprocess(devices):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip())
  command = [sys.executable, __file__, "--child", f"--devices={devices}",
             f"--per_device_batch={_PER_DEVICE_BATCH.value}", f"--image_size={_IMAGE_SIZE.value}",
             f"--steps={_STEPS.value}"]
  result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(f"{devices} devices failed:\n{result.stderr[-4000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if _CHILD.value:
    print(json.dumps(measure(_PER_DEVICE_BATCH.value, _IMAGE_SIZE.value, _STEPS.value)))
    return
  print(f"HVSA (configs/hvsa.py default), {_IMAGE_SIZE.value} px, {_PER_DEVICE_BATCH.value} examples per device, "
        f"virtual CPU devices on {os.cpu_count()} cores\n")
  print("| devices | global batch | compile+1st step s | s/step | images/s | temp MiB / device |")
  print("|---:|---:|---:|---:|---:|---:|")
  for devices in map(int, _DEVICES.value):
    r = run_subprocess(devices)
    print(f"| {r['devices']} | {r['global_batch']} | {r['compile_s']:.1f} | {r['s_per_step']:.3f} | "
          f"{r['images_per_s']:.0f} | {r['temp_mib']:.1f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
