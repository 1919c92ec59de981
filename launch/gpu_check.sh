#!/usr/bin/env bash
# Prepared GPU check: the default recipe to the target on one GPU in fp32, bf16 and fp16,
# then, with two or more GPUs, 2-process DDP, which must stop on the same epoch as fp32.
# Prints each run's epochs and a summary line. A few minutes on one H100; never part of CI.
#   DATA_DIR=data launch/gpu_check.sh [extra training flags]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-data}
RUNS=${RUNS_DIR:-runs/gpu-check-$(date +%Y%m%d-%H%M%S)}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, accelerate; print('torch', torch.__version__, '| accelerate', accelerate.__version__, '|', torch.cuda.get_device_name(0))"

summary() {  # one line per run from its metrics.json
    python3 - "$1" <<'PY'
import json, statistics, sys
m = json.load(open(sys.argv[1] + "/metrics.json"))
ep = m["epochs"]
ips = statistics.median(e["train_images"] / e["train_seconds"] for e in ep)
print(f"SUMMARY {sys.argv[1]}: precision {m['mixed_precision']}, {m['world_size']} process(es): "
      f"reached {m['reached_target']} at epoch {m['stop_epoch']}, val acc {m['final_val_acc']:.2f}%, "
      f"training+eval seconds to the stop (no start-up) {sum(e['seconds'] for e in ep):.2f}, "
      f"process start to stop {m['wall_seconds']:.1f} s, median train images/s {ips:,.0f}, "
      f"seconds per epoch {[round(e['seconds'], 2) for e in ep]}")
PY
}

run() {  # run NAME "ACCELERATE LAUNCH FLAGS" [training flags...]
    local name=$1 launch_flags=$2; shift 2
    # shellcheck disable=SC2086  # launch_flags is a list of words
    accelerate launch -q $launch_flags --num_machines 1 --dynamo_backend no -m mnist_dist.train \
        --data-dir "$DATA_DIR" --output-dir "$RUNS/$name" "$@" | grep -E "^epoch|reached|parameters"
    summary "$RUNS/$name"
}

for p in no bf16 fp16; do
    run "1gpu-$p" "--num_processes 1 --mixed_precision $p" "$@"
done
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    # The same global batch as the one-GPU default (64): 32 per process.
    run "2gpu-no" "--multi_gpu --num_processes 2 --mixed_precision no" --global-batch-size 64 "$@"
    python3 - "$RUNS" <<'PY'
import json, sys
one = json.load(open(sys.argv[1] + "/1gpu-no/metrics.json"))["stop_epoch"]
two = json.load(open(sys.argv[1] + "/2gpu-no/metrics.json"))["stop_epoch"]
print(f"DDP 2 GPUs stop epoch {two} vs 1 GPU {one}: {'same' if one == two else 'DIFFERENT'}")
PY
fi
