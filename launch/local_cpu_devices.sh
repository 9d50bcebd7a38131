#!/usr/bin/env bash
# Runs the trainer on one machine with N virtual CPU devices, so the ('data', 'fsdp') mesh and the sharded global
# batch are exercised exactly as on N accelerators (each virtual device computes its slice of every global batch).
#   launch/local_cpu_devices.sh 8 --config=configs/hvsa.py:runlocal --workdir=/tmp/hvsa8
set -euo pipefail
devices="${1:?usage: $0 NUM_DEVICES --config=... --workdir=... [--config.x=y ...]}"
shift
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}"
export JAX_PLATFORMS=cpu
exec python -m rsalign_jax.main "$@"
