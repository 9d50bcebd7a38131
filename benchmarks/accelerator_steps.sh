#!/usr/bin/env bash
# The accelerator figures of the README's speed section, as one call on a machine with a GPU or TPU (JAX for that
# platform installed): the paper-size HVSA train step at its global batch 256 (configs/hvsa.py:rsitmd) and the
# CLIP dual encoder's default step, each on random inputs; then the HVSA trainer at batch 256 with its input
# pipeline and the paper-size inference towers at batch 256. Prints tables.
#   bash benchmarks/accelerator_steps.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import jax; print(jax.devices())"
python benchmarks/method_steps.py --configs=hvsa --arg=rsitmd --steps=10
python benchmarks/method_steps.py --configs=clip --steps=10
python benchmarks/hvsa_speed.py --batches=256 --reps=1 --train_images=1024 --infer_batch=256
