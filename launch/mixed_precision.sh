#!/usr/bin/env bash
# Mixed precision on one device. PRECISION=bf16 (CPU autocast or GPU) or fp16 (GPU only:
# on a CPU the job refuses it, since Accelerate would otherwise ignore it silently).
#   PRECISION=fp16 launch/mixed_precision.sh [--epochs 10 ...]
set -euo pipefail
cd "$(dirname "$0")/.."
gpus=$(launch/visible_gpus.sh)  # assigned first: a failure to count stops here, not on the CPU
if [ "$gpus" -gt 0 ]; then
    where=(--num_processes 1 --num_machines 1 --dynamo_backend no)
else
    where=(--config_file accelerate_config.yaml)  # the CPU, every core
fi
exec accelerate launch -q "${where[@]}" --mixed_precision "${PRECISION:-bf16}" -m mnist_dist.train "$@"
