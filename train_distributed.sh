#!/usr/bin/env bash
# Multi-process training on one machine through torchrun.
#   ./train_distributed.sh DATASET TRAIN_DIR [extra main.py flags]
# NUM_GPUS (default: all visible GPUs) sets the number of processes. Without GPUs it starts
# NUM_GPUS (default 2) CPU processes with the gloo backend, so it can be tried anywhere.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
dataset=$1 train_dir=$2
shift 2
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
device_args=()
if [ "$gpus" -eq 0 ]; then
  device_args=(--device cpu)
  gpus=2
fi
cd "$(dirname "$0")"
exec torchrun --standalone --nproc_per_node="${NUM_GPUS:-$gpus}" main.py \
  --dataset="$dataset" --train_dir="$train_dir" --multi_gpu "${device_args[@]}" "$@"
