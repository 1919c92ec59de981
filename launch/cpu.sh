#!/usr/bin/env bash
# One CPU process (or one GPU, where there is one), with the project's accelerate config.
#   launch/cpu.sh [--epochs 5 ...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec accelerate launch -q --config_file accelerate_config.yaml -m mnist_dist.train "$@"
