"""A launcher killed with SIGKILL (the OOM killer, `kill -9`, a node agent) at any moment leaves no trainer
behind, whatever adopts the orphans, and one job at a time holds a run folder."""
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from conftest import ACCELERATE, REPO, launch_cmd, read_metrics, run

PROBE = str(REPO / "tests" / "probe")
FLAGS = ["--epochs", "3", "--train-limit", "3000", "--test-limit", "200", "--target-acc", "100"]


@pytest.fixture
def subreaper():
    """This test process adopts the orphans of its descendants (PR_SET_CHILD_SUBREAPER), as systemd, tini and
    container runtimes do: a trainer must not wait for a parent PID of 1."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    assert prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    yield
    prctl(36, 0, 0, 0, 0)


@pytest.mark.parametrize("moment", ["import:accelerate", "call:init_process_group", "call:poll:2", "call:save_state"])
def test_a_launcher_killed_at_any_moment_leaves_no_trainer_and_the_run_continues(tmp_path, mnist_root, subreaper,
                                                                                  moment):
    """2 CPU processes under `accelerate launch --multi_gpu`: its rank 0 kills the launcher when it reaches
    the moment: during imports, as the process group starts (the store lives in the launcher), 20 steps
    into epoch 1 (of 24), as epoch 1's checkpoint is being saved. Then `--resume auto` finishes the run.
    The trainers learn of it asynchronously, so the checkpoint lands at a poll soon after, not a set one."""
    out = tmp_path / "run"
    flags = [*FLAGS, "--data-dir", str(mnist_root), "--output-dir", str(out), "--resume", "auto"]
    cmd, env = launch_cmd(flags, processes=2)
    job = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": PROBE,
                                               "PROBE_KILL_LAUNCHER": moment},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = []
    reader = threading.Thread(target=lambda: output.extend(job.stdout), daemon=True)  # EOF: every writer gone
    reader.start()
    try:
        assert job.wait(timeout=300) == -signal.SIGKILL
        killed = time.monotonic()
        orphans = psutil.Process().children()  # the launcher is reaped: its 2 trainers, now ours (maybe exited)
        assert len(orphans) == 2
        _, alive = psutil.wait_procs(orphans, timeout=30)  # they are ours now: this also reaps them
        reader.join(timeout=30 - (time.monotonic() - killed))
        assert not alive, f"trainers outlived their launcher by 30 s: {alive}\n{''.join(output)[-3000:]}"
        gone = time.monotonic() - killed
    finally:
        for p in psutil.Process().children(recursive=True):
            p.kill()
    text = "".join(output)
    assert "Traceback" not in text, text[-3000:]
    if moment in ("call:poll:2", "call:save_state"):  # training: a checkpoint at the next poll, and the usual line
        [saved] = re.findall(r"mnist_dist: stopped by SIGTERM; saved (\S+)\.", text)
        assert re.fullmatch(r"epoch_000[0-2]_step_\d{5}", os.path.basename(saved)) and os.path.isdir(saved), saved
    else:  # starting: nothing to save
        assert text.count("mnist_dist: error: the launcher") == 1, text[-3000:]
        assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())

    cmd, env = launch_cmd(flags, processes=2)
    started = time.monotonic()
    resumed = run(cmd, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = read_metrics(out)["epochs"]
    assert [e["epoch"] for e in history] == [1, 2, 3]
    assert {e["train_images"] for e in history} == {24 * 64 * 2}  # every image once, whatever was interrupted
    print(f"launcher killed at {moment}: every trainer gone {gone:.1f} s later; --resume auto to the end "
          f"{time.monotonic() - started:.1f} s")


def test_a_second_job_on_a_run_folder_in_use_is_refused_naming_the_first(tmp_path, mnist_root):
    out, log = tmp_path / "run", tmp_path / "log"
    log.mkdir()
    flags = ["--train-limit", "3000", "--test-limit", "200", "--target-acc", "100", "--data-dir", str(mnist_root),
             "--output-dir", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "mnist_dist.train", *flags, "--epochs", "1000"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in first.stdout:
            if line.startswith("epoch  1/"):  # the first job holds the folder and has a checkpoint
                break
        cmd, env = launch_cmd([*flags, "--epochs", "1000", "--resume"])
        second = run(cmd, env={**env, "PYTHONPATH": PROBE, "PROBE_LOG": str(log)}, timeout=300)
        assert second.returncode != 0
        [line] = [x for x in second.stderr.splitlines() if x.startswith("mnist_dist: error:")]
        assert f"'{out}' is in use by another job (PID {first.pid} on host {socket.gethostname()}, since" in line
        # Nothing written in the run folder: the folder's mkdir (it exists) and the lock file's opening (read-write)
        # are how the job learnt that it is held.
        wrote = [x for x in (log / "rank0.log").read_text().splitlines() if str(out) in x]
        assert wrote == [f"os.mkdir {out}", f"write {out / 'job.lock'}"], wrote
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 143
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    # Once the holder is gone, whatever way it went, the folder is free: the run continues and ends.
    resumed = run([sys.executable, "-m", "mnist_dist.train", *flags, "--epochs", "2", "--resume"], timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [e["epoch"] for e in read_metrics(out)["epochs"]] == [1, 2]
