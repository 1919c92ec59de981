#!/usr/bin/env bash
# The GPUs this process may use (CUDA_VISIBLE_DEVICES; default every one), with DDP over NCCL, one process each.
#   CUDA_VISIBLE_DEVICES=0,1 PRECISION=bf16 launch/multi_gpu.sh [--global-batch-size 512 ...]
#   NPROC=2 launch/multi_gpu.sh ...        # the first 2 of them
# --batch-size is per process: without --global-batch-size, N GPUs train on N x the batch.
# --main_process_port 0: a free port, so that two jobs on one machine do not collide.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC=${NPROC:-$(launch/visible_gpus.sh)}
exec accelerate launch --multi_gpu --num_processes "$NPROC" --num_machines 1 --main_process_port 0 \
    --mixed_precision "${PRECISION:-no}" --dynamo_backend no -m mnist_dist.train "$@"
