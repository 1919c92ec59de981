"""Faults through the launchers users run: a signal to `accelerate launch`, to every process of a job, DataLoader
workers at exit, a worker killed under `--max_restarts`, and two machines (here: two launches on one host)
sharing a run and a data folder. Each fault is sent by the run itself on reaching a named step
(tests/probe/sitecustomize.py), so it lands at the same point on a machine of any speed."""
import os
import re
import sys
from pathlib import Path

import pytest

from conftest import ACCELERATE, POLL, REPO, Job, at, count_correct, free_port, launch_cmd, read_metrics, run


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_to_accelerate_launch_checkpoints_every_trainer_and_the_run_resumes(tmp_path, mnist_root, processes):
    """One process: `accelerate launch` with no config file. Two: --multi_gpu (torchrun's agent). Both launchers
    pass the signal on and exit 143 (Accelerate 1.16). The signal comes at step 10 of epoch 1; the checkpoint
    lands at the poll after the trainers learn of it."""
    out = tmp_path / "run"
    flags = ["--epochs", "1", "--train-limit", "3000", "--test-limit", "500", "--target-acc", "100",
             "--data-dir", str(mnist_root), "--output-dir", str(out)]
    cmd, env = launch_cmd(flags, processes)
    if processes == 1:
        cmd = [ACCELERATE, "launch", "-m", "mnist_dist.train", *flags]  # no config: as on a fresh machine
    job = Job(cmd, {**env, **at(f"{POLL}:1", "TERM>launcher")})
    output = job.finish(deadline=120)  # the output ends once every trainer is gone
    assert job.process.returncode == 143, output[-3000:]
    [saved] = re.findall(r"mnist_dist: stopped by SIGTERM; saved (\S+)\. Continue with the same command plus "
                         r"--resume \S+$", output, re.M)
    assert re.fullmatch(r"epoch_0000_step_000[1-4]\d", Path(saved).name), saved  # within epoch 1 (47 steps)
    cmd, env = launch_cmd(flags + ["--resume"], processes)
    resumed = run(cmd, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    # Every image of the epoch once, before and after the stop: 3,000 on one process; on two, 24 steps of 64
    # each (1,500 images a rank and 36 repeats that even out the ranks' last steps).
    assert [e["train_images"] for e in read_metrics(out)["epochs"]] == [3000 if processes == 1 else 24 * 64 * 2]


def test_sigterm_to_every_process_of_the_job_spares_the_dataloader_workers(tmp_path, mnist_root):
    """As a scheduler stops a job (SLURM's scancel signals every process of it, Ctrl-C the whole process
    group): SIGTERM to the launcher, the trainers and their DataLoader workers at once, at step 10. The
    workers leave it to their trainer, which saves; the run resumes to its end."""
    out = tmp_path / "run"
    flags = ["--loader", "torchvision", "--workers", "1", "--epochs", "1", "--train-limit", "3000",
             "--test-limit", "500", "--target-acc", "100", "--data-dir", str(mnist_root), "--output-dir", str(out)]
    cmd, env = launch_cmd(flags, processes=2)
    job = Job(cmd, {**env, **at(f"{POLL}:1", "TERM>job")})
    output = job.finish(deadline=120)
    # The agent, signalled with its workers, reports their exit (1) or its own signal (143): whichever comes first.
    assert job.process.returncode in (1, 143), output[-3000:]
    assert "DataLoader worker" not in output, output[-3000:]
    assert output.count("mnist_dist: stopped by SIGTERM; saved") == 1, output[-3000:]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch_0000_step_00010"]  # the poll it came at
    cmd, env = launch_cmd(flags + ["--resume"], processes=2)
    resumed = run(cmd, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    # Every image of the epoch once, before and after the stop: 24 steps of 64 on each of the 2 ranks.
    assert [e["train_images"] for e in read_metrics(out)["epochs"]] == [24 * 64 * 2]


def test_a_run_on_dataloader_workers_exits_when_it_is_done(tmp_path, mnist_root):
    """At exit multiprocessing stops the workers with SIGTERM and waits for them: the workers, which leave
    SIGTERM to their trainer while it trains (above), must honour it then, or the trainer waits forever."""
    out = tmp_path / "run"
    job = Job([ACCELERATE, "launch", "-q", "-m", "mnist_dist.train", "--loader", "torchvision", "--epochs", "1",
               "--train-limit", "1000", "--test-limit", "100", "--data-dir", str(mnist_root), "--output-dir", str(out)])
    job.finish(deadline=120)  # fails if a worker, or the trainer waiting for it, lives on
    assert job.process.returncode == 0 and (out / "metrics.json").is_file(), job.output[-3000:]


def test_a_worker_killed_under_max_restarts_heals_with_one_history(tmp_path, mnist_root):
    """No --output-dir: the restarted group must find its run folder (runs/<launch time>-<launcher pid>)
    and continue from its newest checkpoint, with no person involved. Rank 1 is killed 20 steps into epoch 2."""
    cmd = [ACCELERATE, "launch", "-q", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port()),
           "--max_restarts", "1", "-m", "mnist_dist.train", "--epochs", "3", "--train-limit", "3000",
           "--test-limit", "500", "--target-acc", "100", "--data-dir", str(mnist_root)]
    # 24 steps an epoch, polled at steps 10, 20 and 24: the 5th poll is step 20 of epoch 2.
    job = Job(cmd, {"ACCELERATE_USE_CPU": "1", **at(f"{POLL}:5", "KILL>self", rank=1)}, tmp_path)
    output = job.finish(deadline=300)
    assert job.process.returncode == 0, output[-3000:]
    [out] = (tmp_path / "runs").iterdir()
    history = read_metrics(out)["epochs"]
    assert [e["epoch"] for e in history] == [1, 2, 3]
    assert re.search(r"resumed from \S+epoch_0001 after epoch 1$", output, re.M), output[-3000:]


def test_two_machines_on_one_host_share_one_run_and_one_data_folder(tmp_path, mnist_root):
    """launch/multi_node.sh twice, machine ranks 0 and 1, one CPU process each over gloo. The data
    folder starts empty: both machines prepare it at once."""
    out, data = tmp_path / "run", tmp_path / "data"
    env = {"ACCELERATE_USE_CPU": "1", "GPUS_PER_NODE": "1", "NUM_MACHINES": "2", "MAIN_ADDR": "127.0.0.1",
           "MAIN_PORT": str(free_port()), "PATH": f"{Path(ACCELERATE).parent}:{os.environ['PATH']}"}
    flags = ["--epochs", "1", "--train-limit", "1000", "--test-limit", "1001", "--eval-batch-size", "100",
             "--data-dir", str(data), "--output-dir", str(out)]
    machines = [Job([str(REPO / "launch" / "multi_node.sh"), *flags], {**env, "MACHINE_RANK": str(rank)}, tmp_path)
                for rank in (0, 1)]
    outputs = [m.finish(deadline=300) for m in machines]
    assert [m.process.returncode for m in machines] == [0, 0], outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "run"]  # one run folder
    m = read_metrics(out)
    assert m["world_size"] == 2
    last = m["epochs"][-1]
    assert last["val_total"] == 1001
    assert count_correct(out / "model.safetensors", mnist_root, 1001) == last["val_correct"]


def test_sigint_stops_with_a_checkpoint_and_exit_130(tmp_path, mnist_root):
    """Ctrl-C: the same stop as SIGTERM, with the shell's code for SIGINT."""
    out = tmp_path / "run"
    flags = ["--epochs", "1", "--train-limit", "3000", "--test-limit", "200", "--data-dir", str(mnist_root),
             "--output-dir", str(out)]
    stopped = run([sys.executable, "-m", "mnist_dist.train", *flags], env=at(f"{POLL}:1", "INT>self"))
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert f"mnist_dist: stopped by SIGINT; saved {out / 'checkpoints' / 'epoch_0000_step_00010'}." in stopped.stderr
