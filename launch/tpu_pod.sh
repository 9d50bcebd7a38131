#!/usr/bin/env bash
# Trains on a Cloud TPU pod slice: creates the TPU VM, copies this repository to every worker, installs it, runs the
# same command on all workers (one JAX process per worker host) and copies workdir results back. Not runnable on
# this project's machines (no gcloud, no network); written from the Cloud TPU and JAX multi-host docs and untested.
#
#   BUCKET=my-bucket ZONE=us-central2-b TPU_NAME=rsalign ACCELERATOR=v4-32 launch/tpu_pod.sh \
#       --config=configs/hvsa.py:rsicd,manual_dir=/mnt/gcs/RSICD --workdir=/mnt/gcs/workdirs/hvsa
#
# `--distributed=on` makes every worker call jax.distributed.initialize() with no arguments; JAX reads the worker
# list and this worker's id from the TPU VM metadata. Each worker builds the tfds dataset in its own
# ~/tensorflow_datasets (the builds are deterministic, so all workers read identical data); real datasets need
# manual_dir readable on every worker. The workdir must be one directory that every worker sees (orbax writes a
# checkpoint from all processes and process 0 renames it when complete), so the bucket gs://$BUCKET is mounted with
# gcsfuse at /mnt/gcs on every worker; it also keeps checkpoints when the VM is deleted.
# Process 0 (worker 0) writes logs, metrics.jsonl and results.json.
# Preemption (spot/preemptible TPUs): GCE sends SIGTERM; the trainer checkpoints the step all workers agree on and
# exits 0. Rerun this script (same workdir) on a recreated VM to resume from it.
set -euo pipefail
: "${1:?usage: $0 --config=... --workdir=... [--config.x=y ...] (env: BUCKET, ZONE, TPU_NAME, ACCELERATOR, RUNTIME)}"
bucket="${BUCKET:?set BUCKET to a GCS bucket for the workdir (mounted at /mnt/gcs on every worker)}"
zone="${ZONE:-us-central2-b}"
name="${TPU_NAME:-rsalign}"
accelerator="${ACCELERATOR:-v4-32}"
runtime="${RUNTIME:-tpu-ubuntu2204-base}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
workdir=""
for arg in "$@"; do
  case "$arg" in --workdir=*) workdir="${arg#--workdir=}" ;; esac
done
: "${workdir:?pass --workdir=DIR}"

gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accelerator" --version="$runtime"

# Copy the repository (without workdirs or virtualenvs) to every worker, install it with the TPU jax wheel and mount
# the bucket (gcsfuse from Google's apt repository).
tar -C "$repo" --exclude=.git --exclude=.venv --exclude=workdirs -czf /tmp/rsalign_jax.tgz .
gcloud compute tpus tpu-vm scp /tmp/rsalign_jax.tgz "$name":~/ --zone="$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
  mkdir -p ~/rsalign_jax && tar -C ~/rsalign_jax -xzf ~/rsalign_jax.tgz &&
  python3 -m venv ~/venv && ~/venv/bin/pip install -q -e ~/rsalign_jax 'jax[tpu]' &&
  echo 'deb https://packages.cloud.google.com/apt gcsfuse-jammy main' |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list &&
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - &&
  sudo apt-get update -q && sudo apt-get install -y -q gcsfuse &&
  sudo mkdir -p /mnt/gcs && sudo chown \$USER /mnt/gcs && gcsfuse --implicit-dirs ${bucket} /mnt/gcs"

# The same command on every worker, at once; quoted so that the workers' shell sees each argument unchanged.
args="$(printf '%q ' "$@")"
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
  cd ~/rsalign_jax && ~/venv/bin/python -m rsalign_jax.main --distributed=on ${args}"

# Results, TensorBoard events and metrics.jsonl, as worker 0 wrote them (a path under /mnt/gcs is in the bucket).
mkdir -p "tpu_results/${name}"
gcloud compute tpus tpu-vm scp "$name":"${workdir}/results.json" "$name":"${workdir}/metrics.jsonl" \
  "tpu_results/${name}/" --zone="$zone" --worker=0
echo "results in tpu_results/${name}/; delete the TPU with:"
echo "  gcloud compute tpus tpu-vm delete ${name} --zone=${zone} --quiet"
