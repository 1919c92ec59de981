"""launch/slurm.sbatch as written, on a real one-node SLURM cluster (tests/slurm/cluster.sh) with two CPU
processes: a job requeued mid-run, as preemption or a node failure requeues it, continues its run by itself,
and `scancel --signal=TERM` saves a checkpoint through srun and the launcher. Rank 0 pauses at step 10 of
epoch 2 (tests/probe/sitecustomize.py) until the signal comes, so that the signal lands at that step on a
machine of any speed."""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import POLL, REPO, at, free_port, read_metrics, wait_until

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
FLAGS = ["--epochs", "3", "--train-limit", "3000", "--test-limit", "500", "--target-acc", "100"]
# 3000 images in steps of 64 per rank over 2 ranks: 24 steps per epoch (Accelerate pads the last), polled
# at steps 10, 20 and 24, so the 4th poll is step 10 of epoch 2. The job's first start pauses there.
PAUSE = at(f"{POLL}:4", "PAUSE")
STOPPED_AT = "epoch_0001_step_00010"  # the checkpoint that the signal saves there


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The environment in which sbatch, scontrol and scancel reach the test's own cluster."""
    missing = [] if os.geteuid() == 0 else ["root"]
    missing += [tool for tool in ("slurmctld", "slurmd", "munged") if not shutil.which(tool)]
    if missing:
        message = f"a one-node SLURM cluster needs {', '.join(missing)} (the README's test install brings it)"
        if os.environ.get("CI"):
            pytest.fail(message)  # .ci/run installs it: there, a missing cluster is a failure, not a skip
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURMCTLD_PORT": str(free_port()), "SLURMD_PORT": str(free_port()),
           "SLURM_CONF": str(folder / "slurm.conf")}
    started = subprocess.run([str(CLUSTER), "start", str(folder)], env=env, capture_output=True, text=True, timeout=60)
    assert started.returncode == 0, started.stdout + started.stderr
    yield {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}  # the job finds `accelerate` here
    subprocess.run(["scancel", "--full", "--user", "root"], env=env, timeout=30)
    subprocess.run([str(CLUSTER), "stop", str(folder)], env=env, timeout=60)


def sbatch(slurm: dict, folder: Path, data: Path, *flags: str, env: dict | None = None) -> str:
    """Submit launch/slurm.sbatch with 2 CPU processes, run from `folder`, with `env` added to the environment
    that sbatch passes on to the job; the job id."""
    cmd = ["sbatch", "--parsable", "--nodes", "1", "--gres=none", "--chdir", str(folder),
           "--output", str(folder / "job.log"), str(REPO / "launch" / "slurm.sbatch"), *FLAGS, *flags,
           "--data-dir", str(data)]
    submitted = subprocess.run(cmd, env={**slurm, "ACCELERATE_USE_CPU": "1", "GPUS_PER_NODE": "2", **(env or {})},
                               capture_output=True, text=True, timeout=30)
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0]


def job_field(slurm: dict, job: str, name: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], env=slurm, capture_output=True, text=True,
                           timeout=30).stdout
    found = re.search(rf"\b{name}=(\S+)", shown)
    return found.group(1) if found else ""


def wait_for(what: str, test, deadline: float, log: Path):
    """conftest.wait_until, with the job's log in the failure."""
    try:
        return wait_until(what, test, deadline, every=0.2)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{log.read_text()[-3000:] if log.exists() else ''}") from None


def in_log(folder: Path, text: str):
    log = folder / "job.log"
    return log.exists() and text in log.read_text()


def finished(slurm: dict, job: str, log: Path) -> str:
    return wait_for("the job to end", lambda: job_field(slurm, job, "JobState") in ("COMPLETED", "FAILED",
                    "CANCELLED", "TIMEOUT") and job_field(slurm, job, "JobState"), 600, log)


def assert_one_history(out: Path, output: str) -> None:
    m = read_metrics(out)
    assert [e["epoch"] for e in m["epochs"]] == [1, 2, 3] and m["world_size"] == 2, output[-3000:]
    assert len({e["train_images"] for e in m["epochs"]}) == 1  # the interrupted epoch counted every image once


def assert_continued(output: str) -> None:
    """The signal stopped the first start at the pause, and the next start continued from there."""
    assert output.count("probe: paused at") == 1, output[-3000:]
    assert re.search(rf"stopped by SIGTERM; saved \S*/{STOPPED_AT}\. ", output), output[-3000:]
    assert re.search(rf"resumed from \S*/{STOPPED_AT} after epoch 1, step 10\n", output), output[-3000:]


def test_a_job_requeued_mid_run_continues_its_run_by_itself(slurm, tmp_path, mnist_root):
    log = tmp_path / "job.log"
    job = sbatch(slurm, tmp_path, mnist_root, env=PAUSE)
    wait_for("rank 0 to pause in epoch 2", lambda: in_log(tmp_path, "probe: paused at"), 300, log)
    requeued = time.monotonic()
    subprocess.run(["scontrol", "requeue", job], env=slurm, check=True, timeout=30)
    wait_for("the job to start again", lambda: in_log(tmp_path, "resumed from"), 300, log)
    assert finished(slurm, job, log) == "COMPLETED", log.read_text()[-3000:]
    output = log.read_text()
    assert job_field(slurm, job, "Restarts") == "1"
    assert output.count("stopped by SIGTERM; saved") == 1  # the requeue's SIGTERM: a checkpoint first
    assert_continued(output)
    assert_one_history(tmp_path / "runs" / f"slurm-{job}", output)
    print(f"requeued mid-run: job {job} continued and completed {time.monotonic() - requeued:.1f} s later")


def test_scancel_saves_a_checkpoint_and_a_requeue_continues_it(slurm, tmp_path, mnist_root):
    log = tmp_path / "job.log"
    job = sbatch(slurm, tmp_path, mnist_root, env=PAUSE)
    wait_for("rank 0 to pause in epoch 2", lambda: in_log(tmp_path, "probe: paused at"), 300, log)
    subprocess.run(["scancel", "--signal=TERM", job], env=slurm, check=True, timeout=30)
    assert finished(slurm, job, log) == "FAILED", log.read_text()[-3000:]  # exit 143 (SIGTERM), through srun
    out = tmp_path / "runs" / f"slurm-{job}"
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert saved == ["epoch_0001", STOPPED_AT], (saved, log.read_text()[-3000:])
    subprocess.run(["scontrol", "requeue", job], env=slurm, check=True, timeout=30)
    wait_for("the job to start again", lambda: in_log(tmp_path, "resumed from"), 300, log)
    assert finished(slurm, job, log) == "COMPLETED", log.read_text()[-3000:]
    output = log.read_text()
    assert job_field(slurm, job, "Restarts") == "1"
    assert_continued(output)
    assert_one_history(out, output)
