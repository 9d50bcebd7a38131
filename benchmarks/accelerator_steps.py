"""The accelerator figures of the README's speed section, as one call on a machine with a GPU or TPU.

  python benchmarks/accelerator_steps.py

Needs JAX for that platform. Prints the devices, then runs, each on random inputs and printing its tables:
  1. the paper-size HVSA train step at its global batch 256 (`method_steps.py --configs=hvsa --arg=rsitmd`);
  2. the CLIP dual encoder's default train step (`method_steps.py --configs=clip`);
  3. the HVSA trainer at batch 256 with its input pipeline, and the paper-size inference towers at batch 256
     (`hvsa_speed.py --batches=256 --reps=1 --train_images=1024 --infer_batch=256`).
Each runs as its own process from the repository root; the first one that fails stops the rest.
"""
import pathlib
import subprocess
import sys

from absl import app

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = (
    ["benchmarks/method_steps.py", "--configs=hvsa", "--arg=rsitmd", "--steps=10"],
    ["benchmarks/method_steps.py", "--configs=clip", "--steps=10"],
    ["benchmarks/hvsa_speed.py", "--batches=256", "--reps=1", "--train_images=1024", "--infer_batch=256"],
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  subprocess.run([sys.executable, "-c", "import jax; print(jax.devices())"], cwd=ROOT, check=True)
  for step in STEPS:
    print(f"\n$ python {' '.join(step)}", flush=True)
    subprocess.run([sys.executable, *step], cwd=ROOT, check=True)


if __name__ == "__main__":
  app.run(main)
