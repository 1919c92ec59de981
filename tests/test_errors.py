"""Bad input gets one clear paragraph and a non-zero status, never a traceback, and overwrites nothing."""
import contextlib
import gzip
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from mnist_dist.data import RESOURCES
from mnist_dist.evaluate import load_net

from conftest import launch, launch_cmd, run, start, wait_until, write_idx


def train(*args):
    result = run([sys.executable, "-m", "mnist_dist.train", *args], timeout=300)
    assert "Traceback" not in result.stderr
    return result


def test_corrupt_data_files(tmp_path):
    for name, _ in RESOURCES:
        (tmp_path / name).write_bytes(gzip.compress(b"not mnist"))
    result = train("--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "r"))
    assert result.returncode == 2 and "corrupt" in result.stderr and "delete it" in result.stderr


def test_output_folder_that_cannot_be_written(tmp_path, mnist_root):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = train("--data-dir", str(mnist_root), "--output-dir", str(blocker / "run"))
    assert result.returncode == 2 and "cannot write the run folder" in result.stderr


def test_a_loss_diverging_in_epoch_1_stops_at_once_and_names_no_checkpoint(tmp_path, mnist_root):
    out = tmp_path / "r"
    result = train("--lr", "1e6", "--epochs", "3", "--train-limit", "3000", "--test-limit", "200",
                   "--data-dir", str(mnist_root), "--output-dir", str(out))
    assert result.returncode == 2
    assert "the loss diverged at epoch 1, by step 10 of" in result.stderr and "checkpoint" not in result.stderr
    assert not (out / "model.safetensors").exists()


def test_a_loss_diverging_after_epoch_1_keeps_that_checkpoint_which_loads(tmp_path, mnist_root):
    # One step per epoch: epoch 1 computes its loss with the initial weights, then a first Adam
    # step of lr/25 = 40,000 throws them far away; epoch 2's first loss diverges.
    out = tmp_path / "r"
    flags = ["--lr", "1e6", "--epochs", "3", "--train-limit", "64", "--batch-size", "64", "--test-limit", "200",
             "--data-dir", str(mnist_root), "--output-dir", str(out)]
    result = train(*flags)
    assert result.returncode == 2 and "the loss diverged at epoch 2, by step 1 of 1" in result.stderr
    kept = out / "checkpoints" / "epoch_0001"
    assert f"resume from '{kept}', which is kept" in result.stderr
    assert load_net(kept / "model.safetensors") is not None  # the weights load
    again = train(*flags, "--resume")  # and the whole state resumes, diverging again in epoch 2
    assert "resumed from" in again.stdout and "after epoch 1" in again.stdout
    assert again.returncode == 2 and "diverged at epoch 2" in again.stderr


def test_a_bad_resume_path_is_refused_and_writes_nothing_into_an_existing_run_folder(tmp_path, mnist_root):
    out = tmp_path / "r"
    assert train("--epochs", "1", "--train-limit", "256", "--test-limit", "100", "--data-dir", str(mnist_root),
                 "--output-dir", str(out)).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    (tmp_path / "junk").mkdir()  # a folder, but no checkpoint
    result = train("--data-dir", str(mnist_root), "--output-dir", str(out), "--resume", str(tmp_path / "junk"))
    assert result.returncode == 2 and "is neither an mnist_dist run folder nor one of its checkpoints" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    result = train("--data-dir", str(mnist_root), "--output-dir", str(tmp_path / "r2"), "--resume")
    assert result.returncode == 2 and "found no checkpoint" in result.stderr


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)")


@contextlib.contextmanager
def tmpfs(folder, size: str):
    """A tmpfs of `size` mounted at `folder` (created) for the block; yields remount(options)."""
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield lambda options: subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@needs_root
def test_a_full_disk_is_one_error_naming_the_path_and_the_run_resumes_once_there_is_room(tmp_path, mnist_root):
    """The run folder on a 300 KiB tmpfs: the first checkpoint (~180 KB) fits, the second does not.
    On two processes: the main one fails to write, and both stop within seconds."""
    disk = tmp_path / "disk"
    with tmpfs(disk, "300k") as remount:
        out = disk / "run"
        flags = ["--epochs", "3", "--train-limit", "256", "--test-limit", "100", "--target-acc", "100",
                 "--data-dir", str(mnist_root), "--output-dir", str(out)]
        started = time.monotonic()
        full = launch(flags, processes=2, timeout=300)
        assert full.returncode != 0 and time.monotonic() - started < 120
        stderr = full.stderr
        assert not re.search(r'File ".*mnist_dist/\w+\.py"', stderr)  # no traceback of ours (the launcher adds its own)
        assert stderr.count("mnist_dist: error: cannot write the checkpoint") == 1
        assert f"'{out / 'checkpoints' / 'epoch_0002'}'" in stderr and "KiB left on that disk" in stderr
        assert f"The last complete checkpoint is '{out / 'checkpoints' / 'epoch_0001'}'" in stderr
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0001"]  # no .partial left

        remount("size=4m")
        resumed = launch(flags + ["--resume"], processes=2, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        assert [e["epoch"] for e in json.loads((out / "metrics.json").read_text())["epochs"]] == [1, 2, 3]


@needs_root
def test_a_log_write_failing_mid_epoch_stops_every_rank_at_once_and_the_run_resumes(tmp_path, mnist_root):
    """The run folder turns read-only after epoch 1's checkpoint (as a full disk or a lost mount does): the
    main process's next TensorBoard write fails, and both ranks stop at the next poll, with one message
    naming the checkpoint to resume from, instead of a traceback and the other rank waiting for --timeout."""
    disk = tmp_path / "disk"
    with tmpfs(disk, "2m") as remount:
        out = disk / "run"
        flags = ["--epochs", "2", "--train-limit", "6000", "--test-limit", "500", "--target-acc", "100",
                 "--data-dir", str(mnist_root), "--output-dir", str(out)]
        job = start(*launch_cmd(flags, processes=2))
        wait_until("epoch 1's checkpoint", (out / "checkpoints" / "epoch_0001").exists, deadline=300, every=0.02)
        remount("ro")
        broken = time.monotonic()
        output = job.finish(deadline=120)
        assert job.process.returncode != 0 and time.monotonic() - broken < 30, output[-3000:]
        assert output.count("mnist_dist: error: cannot write the trackers' logs") == 1, output[-3000:]
        assert f"continue with --resume {out / 'checkpoints' / 'epoch_0001'}." in output
        # No exception of ours escaped (TensorBoard's writer thread prints its own, which may show our
        # log() frame: that is where its error surfaced).
        assert not re.search(r'File ".*mnist_dist/train\.py", line \d+, in main', output)
        remount("rw")
        resumed = launch(flags + ["--resume"], processes=2, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        assert [e["epoch"] for e in json.loads((out / "metrics.json").read_text())["epochs"]] == [1, 2]


@needs_root
def test_a_prepared_data_folder_on_read_only_storage_is_used_and_a_write_there_is_one_error(tmp_path):
    """A shared dataset mount: training and evaluate read the prepared files as they are (no lock file
    can be made there); an output asked for on it is one line, not a traceback."""
    data, out = tmp_path / "ro", tmp_path / "run"
    with tmpfs(data, "1m") as remount:
        write_idx(data, torch.randint(0, 256, (64, 28, 28)), torch.arange(64) % 10)
        remount("ro")
        trained = launch(["--epochs", "1", "--data-dir", str(data), "--output-dir", str(out)])
        assert trained.returncode == 0, trained.stderr
        result = data / "result.json"
        evaluated = run([sys.executable, "-m", "mnist_dist.evaluate", str(out), "--data-dir", str(data),
                         "--json", str(result)])
        assert evaluated.returncode == 2 and "test accuracy" in evaluated.stdout
        assert f"mnist_dist.evaluate: error: cannot write '{result}' (Read-only file system)" in evaluated.stderr
        plotted = run([sys.executable, "-m", "mnist_dist.plot", str(out), "-o", str(data / "curves.png")])
        assert plotted.returncode == 2 and "cannot write" in plotted.stderr
        assert "Traceback" not in evaluated.stderr + plotted.stderr
