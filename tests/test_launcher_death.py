"""A launcher killed with SIGKILL (the OOM killer, `kill -9`, a node agent) at any moment leaves no trainer
behind, whatever adopts the orphans, and one job at a time holds a run folder."""
import ctypes
import os
import re
import signal
import socket
import sys
import time

import psutil
import pytest

from conftest import POLL, PROBE, SAVE, Job, at, free_port, launch_cmd, read_metrics, run
FLAGS = ["--epochs", "2", "--train-limit", "3000", "--test-limit", "200", "--target-acc", "100"]


@pytest.fixture
def subreaper():
    """This test process adopts the orphans of its descendants (PR_SET_CHILD_SUBREAPER), as systemd, tini and
    container runtimes do: a trainer must not wait for a parent PID of 1. Whatever it adopted is reaped."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    assert prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    yield
    prctl(36, 0, 0, 0, 0)
    _, alive = psutil.wait_procs(psutil.Process().children(), timeout=5)
    for process in alive:
        process.kill()
    psutil.wait_procs(alive, timeout=5)


START = "call:torch.distributed.distributed_c10d.init_process_group"


@pytest.mark.parametrize("moment", ["import:accelerate", START, f"{POLL}:2", SAVE])
def test_a_launcher_killed_at_any_moment_leaves_no_trainer_and_the_run_continues(tmp_path, mnist_root, subreaper,
                                                                                  moment):
    """2 CPU processes under `accelerate launch --multi_gpu`: its rank 0 kills the launcher when it reaches
    the moment: during imports, as the process group starts (the store lives in the launcher), 20 steps
    into epoch 1 (of 24), as epoch 1's checkpoint is being saved. Then `--resume auto` finishes the run.
    The trainers learn of it asynchronously, so the checkpoint lands at a poll soon after, not a set one."""
    out = tmp_path / "run"
    flags = [*FLAGS, "--data-dir", str(mnist_root), "--output-dir", str(out), "--resume", "auto"]
    cmd, env = launch_cmd(flags, processes=2)
    job = Job(cmd, {**env, **at(moment, "KILL>launcher")})
    assert job.process.wait(timeout=300) == -signal.SIGKILL
    killed = time.monotonic()
    orphans = psutil.Process().children()  # the launcher is reaped: its 2 trainers (and helpers), now ours
    assert len(orphans) >= 2
    _, alive = psutil.wait_procs(orphans, timeout=30)  # this also reaps them
    assert not alive, f"processes outlived their launcher by 30 s: {alive}\n{job.output[-3000:]}"
    gone = time.monotonic() - killed
    text = job.finish(deadline=5)
    assert "Traceback" not in text, text[-3000:]
    if moment in (f"{POLL}:2", SAVE):  # training: a checkpoint at the next poll, and the usual line
        [saved] = re.findall(r"mnist_dist: stopped by SIGTERM; saved (\S+)\.", text)
        assert re.fullmatch(r"epoch_000[01]_step_\d{5}", os.path.basename(saved)) and os.path.isdir(saved), saved
    else:  # starting: nothing to save
        assert text.count("mnist_dist: error: the launcher") == 1, text[-3000:]
        assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())

    cmd, env = launch_cmd(flags, processes=2)
    started = time.monotonic()
    resumed = run(cmd, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = read_metrics(out)["epochs"]
    assert [e["epoch"] for e in history] == [1, 2]
    assert {e["train_images"] for e in history} == {24 * 64 * 2}  # every image once, whatever was interrupted
    print(f"launcher killed at {moment}: every trainer gone {gone:.1f} s later; --resume auto to the end "
          f"{time.monotonic() - started:.1f} s")


def test_a_second_job_on_a_run_folder_in_use_is_refused_naming_the_first(tmp_path, mnist_root):
    out, log = tmp_path / "run", tmp_path / "log"
    log.mkdir()
    flags = ["--train-limit", "3000", "--test-limit", "200", "--target-acc", "100", "--data-dir", str(mnist_root),
             "--output-dir", str(out)]
    first = Job([sys.executable, "-m", "mnist_dist.train", *flags, "--epochs", "1000"])
    first.wait_for("epoch  1/")  # the first job holds the folder and has a checkpoint
    cmd, env = launch_cmd([*flags, "--epochs", "1000", "--resume"])
    second = run(cmd, env={**env, "PYTHONPATH": PROBE, "PROBE_LOG": str(log)}, timeout=300)
    assert second.returncode == 1  # the one-process `accelerate launch -q` on bad input
    [line] = [x for x in second.stderr.splitlines() if x.startswith("mnist_dist: error:")]
    assert f"'{out}' is in use by another job (PID {first.process.pid} on host {socket.gethostname()}, since" in line
    # Nothing written in the run folder: the folder's mkdir (it exists) and the lock file's opening (read-write)
    # are how the job learnt that it is held.
    wrote = [x for x in (log / "rank0.log").read_text().splitlines() if str(out) in x]
    assert wrote == [f"os.mkdir {out}", f"write {out / 'job.lock'}"], wrote
    first.process.send_signal(signal.SIGTERM)
    first.finish(deadline=120)
    assert first.process.returncode == 143
    # Once the holder is gone, whatever way it went, the folder is free: the run continues and ends.
    done = len(re.findall(r"^epoch +\d+/", first.output, re.M))
    resumed = run([sys.executable, "-m", "mnist_dist.train", *flags, "--epochs", str(done + 1), "--resume"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [e["epoch"] for e in read_metrics(out)["epochs"]] == list(range(1, done + 2))


def test_a_trainer_started_after_its_agent_died_exits_at_once(tmp_path):
    """The moment before a trainer begins to watch its parent: torchrun's agent, which hosts the job's store at
    MASTER_ADDR:MASTER_PORT, already gone (here: nothing listens there). The trainer leaves before its imports."""
    agent = {"TORCHELASTIC_RUN_ID": "gone", "TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "2"}
    result = run([sys.executable, "-m", "mnist_dist.train", "--output-dir", str(tmp_path / "run")], env=agent, timeout=60)
    assert (result.returncode, result.stderr) == (1, "mnist_dist: error: the launcher is gone; it stopped before "
                                                     "training began.\n"), result.stderr[-3000:]
    assert not (tmp_path / "run").exists()


LEAVER = """
import atexit, sys
from mnist_dist import job
class Teardown:  # a module global's destructor: it runs in the interpreter's teardown, not as an exit handler
    def __del__(self):
        sys.stderr.write("teardown\\n")
kept = Teardown()
atexit.register(lambda: sys.stderr.write("exit handler\\n"))
sys.stdout.write("buffered, no newline")
job.leave(3)
"""


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_process_of_several_leaves_after_its_exit_handlers_without_the_native_teardown(world_size):
    """job.leave, how a trainer and evaluate end: with WORLD_SIZE > 1 the exit handlers run and the output is
    flushed, the exit status is kept, and the interpreter's teardown is skipped; a single process exits as usual."""
    result = run([sys.executable, "-c", LEAVER], env={"WORLD_SIZE": world_size, "PYTHONUNBUFFERED": None}, timeout=60)
    assert result.returncode == 3 and result.stdout == "buffered, no newline"
    assert result.stderr == ("exit handler\n" if world_size == "2" else "exit handler\nteardown\n"), result.stderr
