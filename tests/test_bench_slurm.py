"""`python -m mnist_dist.bench --slurm` on a real one-node SLURM cluster (test_slurm.py's fixture): the runs as
one job array, two tasks at a time on the node's 2 CPUs, one thread each. Its report holds the runs of the same
bench run here without SLURM, each once, with the same stop epochs and, but for the task requeued mid-run, the
same results to the bit; a task that fails, or an array past its deadline, fails the bench, which names the
missing run and its log. Every trainer's first start pauses at step 20 of epoch 1 (tests/probe/sitecustomize.py)
and the test then requeues or cancels its task, or lets it go on: the fault lands at that step on a machine of
any speed."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import POLL, REPO, Job, at, run, wait_until
from test_slurm import job_field, slurm  # noqa: F401 (slurm: the fixture, one cluster for this module)

# 2,000 images in steps of 64: 32 steps an epoch, polled at steps 10, 20, 30 and 32. Target 90% on 500 test
# images: some seeds stop at epoch 1, others at epoch 2 (at this commit, seeds 1-3 of the package and seed 4).
TRAIN = "--train-limit 2000 --test-limit 500 --epochs 2 --target-acc 90 --report-to none"
PAUSE = at(f"{POLL}:2", "PAUSE")
# Same thread count here and in the tasks: the same float order, so the same trajectories to the bit.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
PAUSED = re.compile(r"probe: paused at \S+ \(PID (\d+)\)")
# One commit for both benches of a test, though another commit may land meanwhile.
HEAD = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                      check=True).stdout.strip()


def bench(data: Path, markdown: Path, *flags: str) -> list[str]:
    """The bench command of both tests; the baseline is the package at HEAD, which the SLURM mode exports into
    its work folder, where the tasks read it."""
    return [sys.executable, "-m", "mnist_dist.bench", "--baseline-ref", HEAD, "--data-dir", str(data),
            f"--train-args={TRAIN}", "--markdown", str(markdown), *flags]


def steer(job: Job, workdir: Path, env: dict, at_pause: dict[int, list[str]]) -> str:
    """Until the bench ends: a trainer paused in the log of array task i gets `at_pause[i] + [JOBID_i]` run
    (scontrol requeue, scancel), any other goes on (SIGUSR2); the bench's output."""
    handled = set()

    def step():
        for log in (workdir / "logs").glob("*.log"):
            task = int(log.stem.split("_")[1])  # logs are JOBID_TASK.log
            for pid in set(PAUSED.findall(log.read_text())) - handled:
                handled.add(pid)
                if task in at_pause:
                    subprocess.run([*at_pause[task], log.stem], env=env, check=True, timeout=30)
                else:
                    os.kill(int(pid), signal.SIGUSR2)
        return job.process.poll() is not None
    wait_until("the bench to end", step, 300, every=0.2)
    return job.finish(60)


def every_run(markdown: Path) -> list[list[str]]:
    """The report's per-run table, without its two columns of seconds."""
    rows = markdown.read_text().split("## Every run")[1].strip().splitlines()[2:]
    return [row.split("|")[1:-3] for row in rows]


def test_an_array_with_a_requeued_task_reports_the_runs_of_the_local_bench(slurm, tmp_path, mnist_root):  # noqa: F811
    workdir, far, here = tmp_path / "work", tmp_path / "far", tmp_path / "here"
    flags = ["--seeds", "4", "--baseline-runs", "1"]  # tasks: baseline 1, package 1, 2, 3, 4
    job = Job([*bench(mnist_root, far / "b.md", *flags), "--slurm", "--workdir", str(workdir),
               "--sbatch-args=--time 10", "--slurm-timeout", "240"], env={**slurm, **PAUSE, **ONE_THREAD})
    output = steer(job, workdir, slurm, {2: ["scontrol", "requeue"]})  # task 2: package seed 2
    assert job.process.returncode == 0, output[-3000:]
    array = re.search(r"submitted as job array (\d+)", output)[1]
    assert job_field(slurm, f"{array}_2", "Restarts") == "1"
    assert job_field(slurm, f"{array}_0", "TimeLimit") == "00:10:00"  # --sbatch-args reached sbatch
    log = (workdir / "logs" / f"{array}_2.log").read_text()
    assert log.count("probe: paused at") == 1 and log.count("stopped by SIGTERM; saved") == 1, log[-3000:]
    assert "resumed from" in log and "after epoch 0, step 20" in log, log[-3000:]
    # One fixed folder per (path, seed): the requeued task continued its run and started no second one.
    assert sorted(p.name for p in workdir.iterdir() if p.is_dir()) == [
        "baseline-seed1", "fast-seed1", "fast-seed2", "fast-seed3", "fast-seed4", "logs", f"source-{HEAD}"]

    local = run(bench(mnist_root, here / "b.md", *flags), timeout=300, env=ONE_THREAD)
    assert local.returncode == 0, local.stderr[-3000:]
    there, near = (json.loads((folder / "bench_runs.json").read_text()) for folder in (far, here))
    assert [sorted(m) for runs in there.values() for m in runs] == [sorted(m) for runs in near.values() for m in runs]
    # path, seed, stop epoch, reached: the same in both reports, for every run.
    assert [row[:4] for row in every_run(far / "b.md")] == [row[:4] for row in every_run(here / "b.md")]
    assert len({m["stop_epoch"] for m in near["fast"]}) > 1  # so that the same stop epochs say something
    # The rest to the bit, the requeued run too: resumed mid-epoch, it draws its augmentation as the whole run did.
    # But its training loss: the sum over its epoch's steps is added up in another order (carried over the resume).
    assert exact(there) == exact(near)
    assert losses(there) == pytest.approx(losses(near), rel=1e-6)
    requeued = next(m for m in there["fast"] if m["seed"] == 2)
    assert [(e["epoch"], e["train_images"]) for e in requeued["epochs"]] == [(1, 2000)]  # every image once


def exact(results: dict) -> list:
    """Every run, with what its trajectory decides."""
    return [(path, m["seed"], m["stop_epoch"], m["final_val_acc"],
             [(e["epoch"], e["train_images"], e["val_loss"], e["val_acc"]) for e in m["epochs"]])
            for path, runs in results.items() for m in runs]


def losses(results: dict) -> list[float]:
    return [e["train_loss"] for runs in results.values() for m in runs for e in m["epochs"]]


def test_a_task_that_fails_fails_the_bench_naming_its_run_and_log(slurm, tmp_path, mnist_root):  # noqa: F811
    workdir = tmp_path / "work"
    job = Job([*bench(mnist_root, tmp_path / "far" / "b.md", "--seeds", "1", "--baseline-runs", "1"), "--slurm",
               "--workdir", str(workdir), "--slurm-timeout", "120"], env={**slurm, **PAUSE, **ONE_THREAD})
    output = steer(job, workdir, slurm, {1: ["scancel"]})  # task 1: package seed 1
    array = re.search(r"submitted as job array (\d+)", output)[1]
    assert job.process.returncode == 1, output[-3000:]
    assert f"1 of 2 runs did not finish: fast seed 1 (task {array}_1, log {workdir}/logs/{array}_1.log)" in output
    assert (workdir / "baseline-seed1" / "metrics.json").is_file() and not (tmp_path / "far").exists()


def test_an_array_past_the_deadline_is_cancelled_and_fails_the_bench(slurm, tmp_path, mnist_root):  # noqa: F811
    # No trainer is let go on from its pause, so the array cannot end before the deadline on any machine.
    late = run([*bench(mnist_root, tmp_path / "far" / "b.md", "--seeds", "1", "--baseline-runs", "1"), "--slurm",
                "--workdir", str(tmp_path / "work"), "--slurm-timeout", "5"], env={**slurm, **PAUSE, **ONE_THREAD},
               timeout=120)
    said = re.search(r"job array (\d+) did not end within --slurm-timeout 5 s; cancelled it", late.stderr)
    assert late.returncode == 1 and said, late.stdout[-2000:] + late.stderr[-2000:]
    wait_until("the cancelled tasks to leave the queue", lambda: not queued(slurm, said[1]), 60)
    assert job_field(slurm, f"{said[1]}_0", "JobState") == "CANCELLED" and not (tmp_path / "far").exists()


def queued(slurm: dict, array: str) -> str:
    """squeue's lines for the tasks of `array` (pending, running, completing)."""
    listed = subprocess.run(["squeue", "-h", "-j", array], env=slurm, capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    return listed.stdout.strip()
