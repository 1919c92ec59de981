#!/usr/bin/env bash
# Several machines, one `accelerate launch` per machine, each with the GPUs it may use (CUDA_VISIBLE_DEVICES;
# default every one; GPUS_PER_NODE=N to choose).
# Run the same command on every machine, with MACHINE_RANK 0..NUM_MACHINES-1:
#   NUM_MACHINES=2 MACHINE_RANK=0 MAIN_ADDR=10.0.0.1 launch/multi_node.sh --global-batch-size 512
#   NUM_MACHINES=2 MACHINE_RANK=1 MAIN_ADDR=10.0.0.1 launch/multi_node.sh --global-batch-size 512
# Give every machine the same --output-dir on shared storage if you want the run
# folder where all can see it; only the main process (machine 0) writes it.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MACHINE_RANK:?set MACHINE_RANK (0 on the main machine)}"
: "${MAIN_ADDR:?set MAIN_ADDR to the main machine address}"
NUM_MACHINES=${NUM_MACHINES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(launch/visible_gpus.sh)}
exec accelerate launch --multi_gpu --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK" \
    --main_process_ip "$MAIN_ADDR" --main_process_port "${MAIN_PORT:-29500}" \
    --num_processes "$((NUM_MACHINES * GPUS_PER_NODE))" --mixed_precision "${PRECISION:-no}" \
    --dynamo_backend no -m mnist_dist.train "$@"
