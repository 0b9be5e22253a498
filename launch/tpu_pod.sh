#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: the same command on every worker (JAX multi-controller).
#
#   launch/tpu_pod.sh TPU_NAME ZONE --config=configs/semantic_lm.py:paper --workdir=gs://BUCKET/run \
#       --config.mesh.fsdp=16 --config.mesh.data=-1
#
# `MODULE=launch.tokenize launch/tpu_pod.sh TPU ZONE <tokenize args>` runs the cache job the same way.
# Assumes the repository and its virtual environment (.venv) sit at the same path on every worker
# (e.g. `gcloud compute tpus tpu-vm scp --worker=all` or a shared image). JAX finds the other workers
# itself (--distributed=on: Cloud TPU metadata), so no coordinator address is needed. The workdir must
# be storage every worker sees (a gs:// bucket): every worker writes its shards of each checkpoint.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: [MODULE=launch.tokenize] $0 TPU_NAME ZONE <launch.train arguments...>" >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2
shift 2
REPO_DIR=${REPO_DIR:-\$HOME/melody-jax}
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  cd $REPO_DIR && PYTHONPATH=. .venv/bin/python -m ${MODULE:-launch.train} --distributed=on$ARGS"
