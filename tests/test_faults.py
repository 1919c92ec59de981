"""Faults through the launchers users run: a signal to `accelerate launch`, DataLoader workers at exit, a
worker killed under `--max_restarts`, and two machines (here: two launches on one host) sharing a run and
a data folder."""
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from conftest import ACCELERATE, REPO, count_correct, free_port, launch_cmd, read_metrics, run, start


def trainers(job: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(job.pid).children(recursive=True) if "mnist_dist.train" in " ".join(p.cmdline())]


def gone_within(processes: list[psutil.Process], seconds: float) -> bool:
    _, alive = psutil.wait_procs(processes, timeout=seconds)
    return not alive


def ignores(process: psutil.Process, signum: int) -> bool:
    """Whether `process` ignores `signum`: the SigIgn mask of /proc/PID/status."""
    try:
        status = Path(f"/proc/{process.pid}/status").read_text()
    except OSError:  # gone
        return False
    mask = next(line for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask.split()[1], 16) >> (signum - 1) & 1)


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_to_accelerate_launch_checkpoints_every_trainer_and_the_run_resumes(tmp_path, mnist_root, processes):
    """One process: `accelerate launch` with no config file, whose launcher does not forward signals
    (the trainer learns of it through a parent-death signal). Two: --multi_gpu, whose agent does."""
    out = tmp_path / "run"
    flags = ["--epochs", "2", "--train-limit", "3000", "--test-limit", "500", "--target-acc", "100",
             "--data-dir", str(mnist_root), "--output-dir", str(out)]
    cmd, env = launch_cmd(flags, processes)
    if processes == 1:
        cmd = [ACCELERATE, "launch", "-m", "mnist_dist.train", *flags]  # no config: as on a fresh machine
    job = start(cmd, env)
    workers = trainers(job)
    assert len(workers) == processes
    job.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    job.communicate(timeout=60)
    assert gone_within(workers, 60 - (time.monotonic() - signalled)), "a trainer outlived its launcher"
    stopped = time.monotonic() - signalled
    [saved] = (out / "checkpoints").iterdir()
    assert saved.name.startswith("epoch_0000_step_")  # where epoch 1 stood
    cmd, env = launch_cmd(flags + ["--resume"], processes)
    resumed = run(cmd, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    history = read_metrics(out)["epochs"]
    assert [e["epoch"] for e in history] == [1, 2]
    assert history[0]["train_images"] == history[1]["train_images"] >= 3000
    print(f"{processes} process(es): launcher exit {job.returncode}; SIGTERM to every trainer gone {stopped:.1f} s; "
          f"resumed run to its end {time.monotonic() - signalled - stopped:.1f} s")


def test_sigterm_to_every_process_of_the_job_spares_the_dataloader_workers(tmp_path, mnist_root):
    """As a scheduler stops a job (SLURM's scancel signals every process of it, Ctrl-C the whole process
    group): SIGTERM to the launcher, the trainers and their DataLoader workers at once. The workers leave
    it to their trainer, which saves; the run resumes to its end."""
    out = tmp_path / "run"
    flags = ["--loader", "torchvision", "--workers", "1", "--epochs", "1", "--train-limit", "6000",
             "--test-limit", "500", "--target-acc", "100", "--data-dir", str(mnist_root), "--output-dir", str(out)]
    cmd, env = launch_cmd(flags, processes=2)
    job = start(cmd, env)
    launcher = psutil.Process(job.pid)
    for _ in range(200):  # the workers start with the first batch, and set their signals up before serving it
        workers = [p for t in trainers(job) for p in t.children()]
        if len(workers) >= 2 and all(ignores(w, signal.SIGINT) for w in workers):  # their worker_init_fn ran
            break
        time.sleep(0.05)
    assert len(workers) >= 2 and all(ignores(w, signal.SIGINT) for w in workers)
    for process in [launcher, *launcher.children(recursive=True)]:
        process.send_signal(signal.SIGTERM)
    output = job.communicate(timeout=60)[0]
    assert "DataLoader worker" not in output, output[-3000:]
    [saved] = (out / "checkpoints").iterdir()
    assert saved.name.startswith("epoch_0000_step_"), output[-3000:]
    cmd, env = launch_cmd(flags + ["--resume"], processes=2)
    resumed = run(cmd, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    # Every image of the epoch once, before and after the stop: 47 steps of 64 on each of the 2 ranks.
    assert [e["train_images"] for e in read_metrics(out)["epochs"]] == [47 * 64 * 2]


def test_a_run_on_dataloader_workers_exits_when_it_is_done(tmp_path, mnist_root):
    """At exit multiprocessing stops the workers with SIGTERM and waits for them: the workers, which leave
    SIGTERM to their trainer while it trains (above), must honour it then, or the trainer waits forever."""
    out = tmp_path / "run"
    job = subprocess.Popen([ACCELERATE, "launch", "-q", "-m", "mnist_dist.train", "--loader", "torchvision",
                            "--epochs", "1", "--train-limit", "1000", "--test-limit", "100", "--data-dir",
                            str(mnist_root), "--output-dir", str(out)], cwd=REPO, stdout=subprocess.DEVNULL)
    processes = [psutil.Process(job.pid)]
    while job.poll() is None and not (out / "metrics.json").exists():
        processes = [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]
        time.sleep(0.2)
    _, waiting = psutil.wait_procs(processes, timeout=60)
    for process in waiting:  # clear them away before failing
        process.kill()
    assert not waiting and job.wait() == 0


def test_a_worker_killed_under_max_restarts_heals_with_one_history(tmp_path, mnist_root):
    """No --output-dir: the restarted group must find its run folder (runs/<launch time>-<launcher pid>)
    and continue from its newest checkpoint, with no person involved."""
    cmd = [ACCELERATE, "launch", "-q", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port()),
           "--max_restarts", "1", "-m", "mnist_dist.train", "--epochs", "3", "--train-limit", "6000",
           "--test-limit", "500", "--target-acc", "100", "--data-dir", str(mnist_root)]
    job = subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONUNBUFFERED": "1"},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in job.stdout:
        if line.startswith("epoch  1/3"):  # epoch 1 is checkpointed right after this line
            break
    time.sleep(2)
    [rank1] = [p for p in trainers(job) if "RANK=1" in " ".join(f"{k}={v}" for k, v in p.environ().items())]
    rank1.kill()
    killed = time.monotonic()
    output = job.stdout.read()
    (tmp_path / "output.log").write_text(output)
    assert job.wait(timeout=300) == 0, output[-3000:]
    [out] = (tmp_path / "runs").iterdir()
    history = read_metrics(out)["epochs"]
    assert [e["epoch"] for e in history] == [1, 2, 3]
    assert "resumed from" in output and "after epoch 1" in output
    print(f"worker killed: job healed and finished (exit 0) {time.monotonic() - killed:.1f} s later")


def test_two_machines_on_one_host_share_one_run_and_one_data_folder(tmp_path, mnist_root):
    """launch/multi_node.sh twice, machine ranks 0 and 1, one CPU process each over gloo. The data
    folder starts empty: both machines prepare it at once."""
    out, data = tmp_path / "run", tmp_path / "data"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "GPUS_PER_NODE": "1", "NUM_MACHINES": "2",
           "MAIN_ADDR": "127.0.0.1", "MAIN_PORT": str(free_port()), "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(ACCELERATE).parent}:{os.environ['PATH']}"}
    flags = ["--epochs", "1", "--train-limit", "1000", "--test-limit", "1001", "--eval-batch-size", "100",
             "--data-dir", str(data), "--output-dir", str(out)]
    machines = [subprocess.Popen([str(REPO / "launch" / "multi_node.sh"), *flags], cwd=tmp_path,
                                 env={**env, "MACHINE_RANK": str(rank)}, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [m.communicate(timeout=300)[0] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "run"]  # one run folder
    m = read_metrics(out)
    assert m["world_size"] == 2
    last = m["epochs"][-1]
    assert last["val_total"] == 1001
    assert count_correct(out / "model.safetensors", mnist_root, 1001) == last["val_correct"]
