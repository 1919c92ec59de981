#!/usr/bin/env bash
# One CPU process using every core, with the project's accelerate config.
#   launch/cpu.sh [--epochs 5 ...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec accelerate launch -q --config_file accelerate_config.yaml -m mnist_dist.train "$@"
