#!/usr/bin/env bash
# One GPU. PRECISION=no|bf16|fp16 (default no).
#   PRECISION=bf16 launch/gpu.sh [--epochs 10 ...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec accelerate launch -q --num_processes 1 --num_machines 1 --mixed_precision "${PRECISION:-no}" \
    --dynamo_backend no -m mnist_dist.train "$@"
