"""launch/slurm.sbatch as written, on a real one-node SLURM cluster (tests/slurm/cluster.sh) with two CPU
processes: a job requeued mid-run, as preemption or a node failure requeues it, continues its run by itself,
and `scancel --signal=TERM` saves a checkpoint through srun and the launcher."""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port, read_metrics, wait_until

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
FLAGS = ["--epochs", "3", "--train-limit", "12000", "--test-limit", "500", "--target-acc", "100"]


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


def sbatch(slurm: dict, folder: Path, data: Path, *flags: str) -> str:
    """Submit launch/slurm.sbatch with 2 CPU processes, run from `folder`; the job id."""
    cmd = ["sbatch", "--parsable", "--nodes", "1", "--gres=none", "--chdir", str(folder),
           "--output", str(folder / "job.log"), str(REPO / "launch" / "slurm.sbatch"), *FLAGS, *flags,
           "--data-dir", str(data)]
    submitted = subprocess.run(cmd, env={**slurm, "ACCELERATE_USE_CPU": "1", "GPUS_PER_NODE": "2"},
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


def test_a_job_requeued_mid_run_continues_its_run_by_itself(slurm, tmp_path, mnist_root):
    log = tmp_path / "job.log"
    job = sbatch(slurm, tmp_path, mnist_root)
    wait_for("epoch 1 to end", lambda: in_log(tmp_path, "epoch  1/3"), 300, log)
    requeued = time.monotonic()
    subprocess.run(["scontrol", "requeue", job], env=slurm, check=True, timeout=30)
    wait_for("the job to start again", lambda: in_log(tmp_path, "resumed from"), 300, log)
    assert finished(slurm, job, log) == "COMPLETED", log.read_text()[-3000:]
    output = log.read_text()
    assert job_field(slurm, job, "Restarts") == "1"
    assert output.count("stopped by SIGTERM; saved") == 1  # the requeue's SIGTERM: a checkpoint first
    resumed = re.search(r"resumed from \S+ after epoch (\d+)", output)
    assert resumed and int(resumed.group(1)) < 3, output[-3000:]
    assert_one_history(tmp_path / "runs" / f"slurm-{job}", output)
    print(f"requeued mid-run: job {job} continued and completed {time.monotonic() - requeued:.1f} s later")


def test_scancel_saves_a_checkpoint_and_a_requeue_continues_it(slurm, tmp_path, mnist_root):
    log = tmp_path / "job.log"
    job = sbatch(slurm, tmp_path, mnist_root)
    wait_for("epoch 1 to end", lambda: in_log(tmp_path, "epoch  1/3"), 300, log)
    subprocess.run(["scancel", "--signal=TERM", job], env=slurm, check=True, timeout=30)
    assert finished(slurm, job, log) != "COMPLETED"
    out = tmp_path / "runs" / f"slurm-{job}"
    saved = [p.name for p in (out / "checkpoints").iterdir()]
    assert any(re.fullmatch(r"epoch_000[12]_step_\d+", name) for name in saved), (saved, log.read_text()[-3000:])
    subprocess.run(["scontrol", "requeue", job], env=slurm, check=True, timeout=30)
    wait_for("the job to start again", lambda: in_log(tmp_path, "resumed from"), 300, log)
    assert finished(slurm, job, log) == "COMPLETED", log.read_text()[-3000:]
    assert_one_history(out, log.read_text())
