#!/usr/bin/env bash
# Several CPU processes on one machine over gloo (DDP without GPUs).
#   NPROC=2 launch/cpu_multi.sh [--global-batch-size 512 ...]
# ACCELERATE_USE_CPU=1 with --multi_gpu is what gives Accelerate a MULTI_CPU state;
# --cpu --num_processes N would start a single process.
set -euo pipefail
cd "$(dirname "$0")/.."
export ACCELERATE_USE_CPU=1
exec accelerate launch --multi_gpu --num_processes "${NPROC:-2}" --main_process_port 0 \
    -m mnist_dist.train "$@"
