#!/usr/bin/env bash
# Runs one multi-process JAX job on this machine: N processes on 127.0.0.1, each with DEVICES_PER_PROCESS virtual
# CPU devices, joined through jax.distributed into one (N x DEVICES_PER_PROCESS)-device mesh. This is how the
# multi-host paths (per-process input rows, cross-process collectives, orbax saves from every process) are
# exercised without a cluster.
#   launch/local_multiprocess.sh 2 4 --config=configs/hvsa.py:runlocal --workdir=/tmp/hvsa_2x4
# Process 0 logs and writes results; the others' output goes to WORKDIR/process_<i>.log. Waits for all processes
# and exits non-zero if any of them failed (then stops the rest). PYTHON selects the interpreter (default: python).
set -euo pipefail
num_processes="${1:?usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS --config=... --workdir=... [--config.x=y ...]}"
devices="${2:?usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS --config=... --workdir=... [--config.x=y ...]}"
shift 2
python="${PYTHON:-python}"
workdir=""
for arg in "$@"; do
  case "$arg" in --workdir=*) workdir="${arg#--workdir=}" ;; esac
done
: "${workdir:?pass --workdir=DIR}"
mkdir -p "$workdir"
port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}"
export JAX_PLATFORMS=cpu
pids=()
for ((i = 0; i < num_processes; i++)); do
  cmd=("$python" -m rsalign_jax.main "$@" --coordinator_address="127.0.0.1:${port}"
       --num_processes="$num_processes" --process_id="$i")
  if ((i == 0)); then
    "${cmd[@]}" &
  else
    "${cmd[@]}" >"${workdir}/process_${i}.log" 2>&1 &
  fi
  pids+=("$!")
done

status=0
for _ in "${pids[@]}"; do
  if ! wait -n; then  # the first process to fail stops the others, which would otherwise wait for it
    status=1
    kill "${pids[@]}" 2>/dev/null || true
  fi
done
exit "$status"
