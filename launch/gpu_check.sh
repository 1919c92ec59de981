#!/usr/bin/env bash
# The prepared check of a GPU machine, in one call; never part of CI:
#   1. the GPU test suite, tests/test_gpu.py (pytest -m gpu): fp32, bf16 and fp16 (its GradScaler), --compile,
#      --cuda-graphs against eager, the average of the weights, host waits per step counted by CUDA itself,
#      one process over NCCL; with two or more GPUs, DDP at the one-GPU global batch and a killed rank;
#   2. time to the target (99.41%) on one GPU, seeds 1-3 in fp32 and bf16, eager, and seed 1 of each with
#      --cuda-graphs: training only, with evaluation, process start to stop; train images/s;
#   3. with two or more GPUs, 2-process DDP at the one-GPU global batch (64), against seed 1 in fp32.
# Ends with one summary block: the GPU, the suite's result, SYNCS, GOAL and DDP lines, failed runs.
# Exit status: 0 if the suite passed and every run ended well.
# Duration on one H100/H200, estimated, not measured: the suite 2-3 minutes (10 runs of 100-200 steps, about
# 10 s each, --compile's warm-up the longest), the time check 8 runs of about 35 s each (what one run to the
# target took on an H200 at an older commit): 7-8 minutes in all; with 2+ GPUs, 3 more suite runs and the DDP
# run, about a minute more. EPOCHS bounds a seed that misses the target.
#   DATA_DIR=data launch/gpu_check.sh [extra training flags for 2 and 3]
#   SEEDS=1 PRECISIONS=no launch/gpu_check.sh   # a shorter time check
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-data}
RUNS=${RUNS_DIR:-runs/gpu-check-$(date +%Y%m%d-%H%M%S)}
EPOCHS=${EPOCHS:-12}
SEEDS=${SEEDS:-1 2 3}
PRECISIONS=${PRECISIONS:-no bf16}
mkdir -p "$RUNS"
SUMMARY=$RUNS/summary.txt  # the lines of the final block, gathered as they come
GPUS=$(launch/visible_gpus.sh)
python3 - "$GPUS" <<'PY' | tee "$SUMMARY"
import sys, torch, accelerate
print(f"GPU: {torch.cuda.get_device_name(0)} ({sys.argv[1]} visible) | torch {torch.__version__} | "
      f"accelerate {accelerate.__version__}")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$SUMMARY"
python3 -c 'import sys; from mnist_dist.data import prepare_mnist; prepare_mnist(sys.argv[1])' "$DATA_DIR"

echo "== 1. the GPU test suite"
suite=0
python3 -m pytest -m gpu -p no:xdist -o addopts="" tests/test_gpu.py -q -rsP 2>&1 | tee "$RUNS/tests.log" || suite=$?
echo "TESTS: $(grep -E '[0-9]+ (passed|failed|skipped|error)|no tests ran' "$RUNS/tests.log" | tail -n 1) (exit $suite)" \
    >> "$SUMMARY"
grep '^SYNCS' "$RUNS/tests.log" >> "$SUMMARY" || true  # printed by the host-wait tests

summary() {  # one line per run from its metrics.json
    python3 - "$1" <<'PY'
import json, statistics, sys
m = json.load(open(sys.argv[1] + "/metrics.json"))
ep = m["epochs"]
ips = statistics.median(e["train_images"] / e["train_seconds"] for e in ep)
print(f"SUMMARY {sys.argv[1]}: precision {m['mixed_precision']}, {m['world_size']} process(es): "
      f"reached {m['reached_target']} at epoch {m['stop_epoch']}, val acc {m['final_val_acc']:.2f}%, "
      f"training only {sum(e['train_seconds'] for e in ep):.2f} s, with evaluation {sum(e['seconds'] for e in ep):.2f} s, "
      f"process start to stop {ep[-1]['elapsed']:.1f} s (to exit {m['wall_seconds']:.1f} s), "
      f"median train images/s {ips:,.0f}, seconds per epoch {[round(e['seconds'], 2) for e in ep]}")
PY
}

failed=0
train() {  # train NAME "ACCELERATE LAUNCH FLAGS" [training flags...]: one run; a failure is noted, not fatal
    local name=$1 launch_flags=$2; shift 2
    # shellcheck disable=SC2086  # launch_flags is a list of words
    if accelerate launch -q $launch_flags --num_machines 1 --dynamo_backend no -m mnist_dist.train \
        --data-dir "$DATA_DIR" --output-dir "$RUNS/$name" --epochs "$EPOCHS" "$@" > "$RUNS/$name.log" 2>&1; then
        grep -E "^epoch|reached|parameters" "$RUNS/$name.log" || true
        summary "$RUNS/$name"
    else
        echo "FAILED run $name (exit $?): $RUNS/$name.log" | tee -a "$SUMMARY"
        tail -n 5 "$RUNS/$name.log"
        failed=1
    fi
}

echo "== 2. time to the target, one GPU"
first=${SEEDS%% *}
for p in $PRECISIONS; do
    for seed in $SEEDS; do
        train "1gpu-$p-eager-seed$seed" "--num_processes 1 --mixed_precision $p" --seed "$seed" "$@"
        if [ "$seed" = "$first" ]; then  # right after its eager twin, so that a slower moment slows both
            train "1gpu-$p-graphs-seed$seed" "--num_processes 1 --mixed_precision $p" --seed "$seed" --cuda-graphs "$@"
        fi
    done
done
# shellcheck disable=SC2086  # PRECISIONS is a list of words
python3 - "$RUNS" $PRECISIONS <<'PY' | tee -a "$SUMMARY"
import glob, json, statistics, sys
for p in sys.argv[2:]:
    for mode in ("eager", "graphs"):
        ms = [json.load(open(f)) for f in sorted(glob.glob(f"{sys.argv[1]}/1gpu-{p}-{mode}-seed*/metrics.json"))]
        hit = [m for m in ms if m["reached_target"]]
        # A run that failed has no metrics.json: its FAILED line says so.
        line = (f"GOAL precision {p}, {mode}: {len(hit)}/{len(ms)} finished seeds reached "
                f"(stop epochs {[m['stop_epoch'] for m in ms]})")
        if hit:
            line += (f"; median seconds to the target, training only "
                     f"{statistics.median(sum(e['train_seconds'] for e in m['epochs']) for m in hit):.2f}, process "
                     f"start to stop {statistics.median(m['epochs'][-1]['elapsed'] for m in hit):.1f} "
                     f"(goal: 3 s and 15 s)")
        print(line)
PY

if [ "$GPUS" -ge 2 ]; then
    echo "== 3. DDP, 2 GPUs"
    # The same global batch as the one-GPU default (64): 32 per process.
    train "2gpu-no" "--multi_gpu --num_processes 2 --main_process_port 0 --mixed_precision no" --global-batch-size 64 "$@"
    python3 - "$RUNS" <<'PY' | tee -a "$SUMMARY"
import json, pathlib, sys
runs = [pathlib.Path(sys.argv[1], name, "metrics.json") for name in ("1gpu-no-eager-seed1", "2gpu-no")]
if all(p.is_file() for p in runs):
    (one, two) = (json.loads(p.read_text()) for p in runs)
    print(f"DDP 2 GPUs stop epoch {two['stop_epoch']} vs 1 GPU {one['stop_epoch']}: "
          f"{'same' if one['stop_epoch'] == two['stop_epoch'] else 'DIFFERENT'}; process start to stop "
          f"{two['epochs'][-1]['elapsed']:.1f} s vs {one['epochs'][-1]['elapsed']:.1f} s")
else:
    print("DDP 2 GPUs: no comparison (" + ", ".join(str(p.parent) for p in runs if not p.is_file()) + " has no metrics.json)")
PY
fi

echo "==== SUMMARY ($RUNS)"
cat "$SUMMARY"
[ "$suite" -eq 0 ] || exit "$suite"
exit "$failed"
