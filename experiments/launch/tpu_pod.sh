#!/bin/bash
# MuSiCa training on a Cloud TPU VM pod slice (e.g. v5litepod-16: 4 hosts): the same command
# on every worker (`--worker=all`); JAX detects the pod and forms the job itself.
#
#   TPU=my-pod ZONE=us-west4-a REPO=https://github.com/you/musica-jax.git \
#   DATA_DIR=/mnt/shared/WFLW WORKDIR=/mnt/shared/runs/wflw98 TFDS_DIR=/mnt/shared/tfds \
#       experiments/launch/tpu_pod.sh wflw98.flags --batch_size=1024
#
# What each worker needs: the package (installed below from REPO), the dataset folder at
# DATA_DIR, and WORKDIR on a filesystem shared by all workers (orbax writes one checkpoint
# from all processes; e.g. a Filestore NFS share mounted at /mnt/shared on every worker).
# TFDS_DIR: shared (prepared once, by process 0) or a local disk (each worker prepares
# its own copy). Local-file paths only: train.py writes run_config.json and metrics.jsonl
# with ordinary file I/O, so gs:// workdirs are not supported.
set -euo pipefail
flagfile=${1:?"usage: tpu_pod.sh FLAGFILE [training flags]"}
shift
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}" "${REPO:?set REPO (git URL)}"
: "${DATA_DIR:?set DATA_DIR}" "${WORKDIR:?set WORKDIR (shared)}" "${TFDS_DIR:?set TFDS_DIR}"
extra=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  set -e
  [ -d musica-jax ] || git clone $REPO musica-jax
  cd musica-jax && pip install -q '.[data]' 'jax[tpu]'
  cd ~ && nohup python -m experiments.train --flagfile=$flagfile --data_dir=$DATA_DIR \
      --workdir=$WORKDIR --tfds_dir=$TFDS_DIR --distributed=auto$extra \
      > musica_train.log 2>&1 &
  echo started on \$(hostname)"
echo "logs: gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=0 --command='tail -f musica_train.log'"
