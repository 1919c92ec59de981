#!/usr/bin/env bash
# All GPUs of this machine with DDP over NCCL, one process per GPU.
#   NPROC=4 PRECISION=bf16 launch/multi_gpu.sh [--global-batch-size 512 ...]
# --batch-size is per process: without --global-batch-size, N GPUs train on N x the batch.
set -euo pipefail
cd "$(dirname "$0")/.."
exec accelerate launch --multi_gpu --num_processes "${NPROC:-$(nvidia-smi -L | wc -l)}" --num_machines 1 \
    --mixed_precision "${PRECISION:-no}" --dynamo_backend no -m mnist_dist.train "$@"
