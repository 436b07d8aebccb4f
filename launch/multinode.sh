#!/usr/bin/env bash
# One node's share of a multi-node run, through torchrun's c10d rendezvous.
# Run the same command on every node:
#   MASTER_ADDR=node0.example NNODES=2 NODE_RANK=<0..NNODES-1> ./launch/multinode.sh DATASET TRAIN_DIR [main.py flags]
# Environment: MASTER_ADDR (required; the rendezvous host), MASTER_PORT (29500), NNODES (required),
# NODE_RANK (required), NPROC_PER_NODE (default: visible GPUs), RDZV_ID (default: seqrec),
# MAX_RESTARTS (default 3: a failed worker restarts the group, which resumes from latest.pt).
set -euo pipefail
if [ $# -lt 2 ] || [ -z "${MASTER_ADDR:-}" ] || [ -z "${NNODES:-}" ] || [ -z "${NODE_RANK:-}" ]; then
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
dataset=$1 train_dir=$2
shift 2
nproc=${NPROC_PER_NODE:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
cd "$(dirname "$0")/.."
exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$nproc" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id="${RDZV_ID:-seqrec}" \
  --max-restarts="${MAX_RESTARTS:-3}" \
  main.py --dataset="$dataset" --train_dir="$train_dir" --multi_gpu --save_every_steps=500 "$@"
