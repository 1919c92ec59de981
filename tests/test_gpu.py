"""The GPU paths, run as a user runs them (launch/gpu.sh, launch/multi_gpu.sh), a few hundred steps each: every
precision, --compile, --cuda-graphs, the average of the weights, the host waits of a step counted by CUDA
itself, NCCL; with two or more GPUs, DDP and a killed rank. Marked `gpu` (`pytest -m gpu`) and skipped without
CUDA; launch/gpu_check.sh runs them on a GPU machine. No test here has run on a GPU yet."""
import json
import math
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import POLL, REPO, Job, at, count_correct, read_metrics, run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more CUDA GPUs")

# 200 steps of 64 and one evaluation on the 10,000 test images; no tracker, which would only add files.
SHORT = ["--epochs", "1", "--train-limit", "12800", "--target-acc", "100", "--report-to", "none"]
STEPS = 200
POLL_STEPS = 10  # mnist_dist.poll's: the one host wait it allows in that many steps


def launched(out, root, *flags, precision="no", processes=0, env=None, timeout=300):
    """launch/gpu.sh (one GPU) or, with `processes`, launch/multi_gpu.sh (NCCL), as the README runs them."""
    script = REPO / "launch" / ("multi_gpu.sh" if processes else "gpu.sh")
    return run([str(script), *SHORT, *flags, "--data-dir", str(root), "--output-dir", str(out)], timeout=timeout,
               env={"PRECISION": precision, "NPROC": str(processes) if processes else None, **(env or {})})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_root):
    """trained(name, *flags, precision=...): the run folder of that short run, trained once for this module
    (the fp32 eager run serves the precision, graphs and average tests alike)."""
    done = {}

    def get(name, *flags, precision="no", timeout=300):
        if name not in done:
            out = tmp_path_factory.mktemp("gpu") / name
            result = launched(out, mnist_root, *flags, precision=precision, timeout=timeout)
            assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
            done[name] = out
        return done[name]

    return get


def assert_trained(out) -> dict:
    """A run of STEPS steps on the GPU whose losses are all finite and which learned; its metrics."""
    m = read_metrics(out)
    assert json.loads((out / "config.json").read_text())["device"].startswith("cuda")
    losses = [e[k] for e in m["epochs"] for k in ("train_loss", "val_loss")]
    assert all(math.isfinite(x) for x in losses), losses
    assert sum(e["train_images"] for e in m["epochs"]) == STEPS * 64
    assert m["final_val_acc"] >= 90, m["final_val_acc"]
    return m


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_each_precision_trains_without_nan(trained, precision):
    out = trained("eager" if precision == "no" else precision, precision=precision)
    assert assert_trained(out)["mixed_precision"] == precision
    if precision == "fp16":
        # The GradScaler's state after the run (Accelerate saves it in each checkpoint): it starts at 2**16,
        # halves at every step whose gradients overflowed (a skipped step), and would double only after 2,000
        # good steps in a row, more than this run has. So scale = 2**(16 - skipped), and the growth tracker
        # counts the good steps since the last skip: all STEPS if none was skipped.
        state = torch.load(out / "checkpoints" / "epoch_0001" / "scaler.pt", weights_only=True)
        scale, good = state["scale"], state["_growth_tracker"]
        skipped = math.log2(2 ** 16 / scale)
        assert skipped == int(skipped) >= 0 and good + skipped <= STEPS, state
        assert (skipped == 0) == (good == STEPS), state


def test_compile_trains_as_eager(trained):
    compiled = assert_trained(trained("compile", "--compile", timeout=600))
    eager = read_metrics(trained("eager"))
    # Fused kernels sum in another order; over 200 steps the mean loss of the epoch stays close.
    assert compiled["epochs"][0]["train_loss"] == pytest.approx(eager["epochs"][0]["train_loss"], rel=5e-2)


def test_cuda_graphs_train_as_eager(trained):
    graphs = assert_trained(trained("graphs", "--cuda-graphs"))
    eager = read_metrics(trained("eager"))
    assert graphs["epochs"][0]["train_loss"] == pytest.approx(eager["epochs"][0]["train_loss"], rel=1e-2)
    assert abs(graphs["final_val_acc"] - eager["final_val_acc"]) <= 1.0


def test_the_average_of_the_weights_runs_on_the_gpu_and_is_what_the_run_saves(trained, mnist_root):
    """--ema is the default: the run evaluates and saves the average (the checkpoint's second model, its
    BatchNorm statistics recomputed on the GPU), not the trained weights, and those scores hold on the CPU."""
    out = trained("eager")
    m = assert_trained(out)
    assert m["weights"].startswith("exponential moving average"), m["weights"]
    saved, last = load_file(out / "model.safetensors"), out / "checkpoints" / "epoch_0001"
    average, weights = load_file(last / "model_1.safetensors"), load_file(last / "model.safetensors")
    common = saved.keys() & average.keys() & weights.keys()
    assert any(k.endswith("running_mean") for k in common), sorted(saved)
    assert all(torch.equal(saved[k], average[k]) for k in common)
    assert not all(torch.equal(saved[k], weights[k]) for k in common)
    row = m["epochs"][-1]
    # The GPU's convolutions and the CPU's round differently: an image at a near tie may change sides.
    assert abs(count_correct(out / "model.safetensors", mnist_root, row["val_total"]) - row["val_correct"]) <= 5


# One process, no launcher, every synchronising CUDA call counted where mnist_dist made it: the warnings of
# torch.cuda.set_sync_debug_mode("warn"), one per wait. Writes {place: count} to argv[1]; argv[2:] are the
# trainer's flags.
COUNT_SYNCS = r'''
import collections, json, runpy, sys, traceback, warnings
import torch
counts, flags = sys.argv[1], sys.argv[2:]
where = collections.Counter()
def count(message, category, filename, lineno, file=None, line=None):
    if "synchronizing CUDA operation" not in str(message):
        return sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
    ours = [f for f in traceback.extract_stack() if "/mnist_dist/" in f.filename]
    where[f"{ours[-1].name}:{ours[-1].lineno}" if ours else "elsewhere"] += 1
warnings.showwarning = count
warnings.simplefilter("always")  # every wait, not only the first from each line
torch.cuda.set_sync_debug_mode("warn")
sys.argv = ["mnist_dist.train", *flags]
code = 1
try:
    runpy.run_module("mnist_dist.train", run_name="__main__")
except SystemExit as end:
    code = end.code
torch.cuda.set_sync_debug_mode(0)
with open(counts, "w") as f:
    json.dump(where, f)
sys.exit(code)
'''


@pytest.mark.parametrize("mode", [[], ["--cuda-graphs"]], ids=["eager", "cuda-graphs"])
def test_a_step_makes_the_host_wait_only_at_its_poll(tmp_path, mnist_root, mode):
    """Host waits counted by CUDA: a run of 200 steps and 16 evaluation batches against one of 100 steps and 8,
    alike otherwise (set-up, one evaluation, one checkpoint, the run's files). The 100 more steps may add their
    10 polls (one wait each, every POLL_STEPS steps) and nothing else: no step and no evaluation batch waits
    on its own."""
    found = {}
    for images, tests in ((6400, 2000), (12800, 4000)):
        counts = tmp_path / f"syncs-{images}.json"
        result = run([sys.executable, "-c", COUNT_SYNCS, str(counts), *SHORT, *mode, "--train-limit", str(images),
                      "--test-limit", str(tests), "--data-dir", str(mnist_root), "--output-dir",
                      str(tmp_path / f"run-{images}")], timeout=300)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        found[images // 64] = json.loads(counts.read_text())
    added = sum(found[200].values()) - sum(found[100].values())
    # For launch/gpu_check.sh's summary (pytest -rP shows it).
    print(f"SYNCS {mode[0] if mode else 'eager'}: {sum(found[200].values())} in a 200-step run, {added} more "
          f"than in 100 steps ({added / 100:.2f} per step; at most {1 / POLL_STEPS}); by place in 200 steps: "
          + ", ".join(f"{k} {n}" for k, n in sorted(found[200].items(), key=lambda kv: -kv[1])))
    assert added <= 100 / POLL_STEPS, found


def test_one_process_over_nccl(tmp_path, mnist_root):
    """launch/multi_gpu.sh with one process: DDP's path (a process group on NCCL) at its smallest."""
    out = tmp_path / "run"
    result = launched(out, mnist_root, processes=1)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert json.loads((out / "config.json").read_text())["distributed_type"] == "MULTI_GPU"
    assert_trained(out)


@TWO_GPUS
def test_two_gpus_at_the_global_batch_of_one_stop_on_its_epoch(tmp_path, mnist_root):
    """2-process DDP with --global-batch-size 64 (32 each) and --sync-bn follows the one-process run: the same
    stop epoch at a target that a few epochs of 12,800 images reach."""
    flags = ["--epochs", "5", "--target-acc", "98", "--global-batch-size", "64", "--sync-bn"]
    one, two = tmp_path / "one", tmp_path / "two"
    for out, processes in ((one, 0), (two, 2)):
        result = launched(out, mnist_root, *flags, processes=processes)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    m1, m2 = read_metrics(one), read_metrics(two)
    assert m1["reached_target"] and m2["world_size"] == 2, (m1, m2)
    assert json.loads((two / "config.json").read_text())["global_batch"] == 64
    assert m2["stop_epoch"] == m1["stop_epoch"], ([e["val_acc"] for e in m1["epochs"]],
                                                  [e["val_acc"] for e in m2["epochs"]])


@TWO_GPUS
def test_a_killed_rank_ends_the_job(tmp_path, mnist_root):
    """Rank 1 is killed (SIGKILL) at step 20; on NCCL, rank 0 may hear nothing of it. The job must still end,
    failed, within a minute, not wait out a collective timeout."""
    out = tmp_path / "run"
    job = Job([str(REPO / "launch" / "multi_gpu.sh"), *SHORT, "--epochs", "3", "--data-dir", str(mnist_root),
               "--output-dir", str(out)], {"NPROC": "2", **at(f"{POLL}:2", "KILL>self", rank=1)})
    job.wait_for("probe: SIGKILL to self", deadline=300)
    killed = time.monotonic()
    output = job.finish(deadline=60)
    assert job.process.returncode != 0, output[-3000:]
    assert not (out / "metrics.json").exists()
    print(f"killed rank: the job ended {time.monotonic() - killed:.1f} s later, exit {job.process.returncode}")
