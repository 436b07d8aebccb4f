#!/usr/bin/env bash
# Multi-process training on one machine through torchrun.
#   ./train_distributed.sh DATASET TRAIN_DIR [extra main.py flags]
# NUM_GPUS (default: all visible GPUs) sets the number of processes. Without GPUs it starts
# NUM_GPUS (default 2) CPU processes with the gloo backend, so it can be tried anywhere.
# --master_port N among the flags (or MASTER_PORT in the environment) pins the job's one port;
# otherwise torchrun --standalone picks a free one.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
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
port=${MASTER_PORT:-} prev=
for arg in "$@"; do
  case $prev in --master_port) port=$arg ;; esac
  case $arg in --master_port=*) port=${arg#*=} ;; esac
  prev=$arg
done
# A static rendezvous on the given port: workers get MASTER_PORT=port, so main.py agrees.
rdzv_args=(--standalone)
if [ -n "$port" ]; then
  rdzv_args=(--master_addr=127.0.0.1 --master_port="$port")
fi
cd "$(dirname "$0")"
exec torchrun "${rdzv_args[@]}" --nproc_per_node="${NUM_GPUS:-$gpus}" main.py \
  --dataset="$dataset" --train_dir="$train_dir" --multi_gpu "${device_args[@]}" "$@"
