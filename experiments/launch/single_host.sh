#!/bin/bash
# MuSiCa training on one machine with several GPUs (or one): one process drives every
# local device; the global --batch_size is split over them (divisible by the GPU count).
#
#   experiments/launch/single_host.sh wflw98.flags --data_dir=/data/WFLW --workdir=/runs/wflw98
#
# Pick GPUs with CUDA_VISIBLE_DEVICES=0,1,... Resumes from the latest checkpoint when the
# same command runs again.
set -euo pipefail
flagfile=${1:?"usage: single_host.sh FLAGFILE [training flags]"}
exec "${PYTHON:-python}" -m experiments.train --flagfile="$flagfile" --distributed=none "${@:2}"
