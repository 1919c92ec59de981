"""Bad input gets one clear paragraph and a non-zero status, never a traceback, and overwrites nothing."""
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnist_dist.model import load_net

from conftest import POLL, SAVE, Job, at, launch, launch_cmd, run, write_idx


def train(*args):
    result = run([sys.executable, "-m", "mnist_dist.train", *args], timeout=300)
    assert "Traceback" not in result.stderr
    return result


def test_output_folder_that_cannot_be_written(tmp_path, mnist_root):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = train("--data-dir", str(mnist_root), "--output-dir", str(blocker / "run"))
    assert result.returncode == 2 and "cannot write the run folder" in result.stderr


def test_a_loss_diverging_in_epoch_1_stops_at_once_and_its_advice_starts_anew(tmp_path, mnist_root):
    out = tmp_path / "r"
    flags = ["--lr", "1e6", "--epochs", "3", "--train-limit", "3000", "--test-limit", "200",
             "--data-dir", str(mnist_root), "--output-dir", str(out)]
    result = train(*flags)
    assert result.returncode == 2
    assert "the loss diverged at epoch 1, by step 10 of" in result.stderr
    assert not (out / "model.safetensors").exists()
    advice = re.search(r"the same command, plus (.*)\.$", result.stderr.strip()).group(1).split()
    assert advice == ["--lr", "500000", "--output-dir", f"{out}-lr500000"]
    followed = train(*flags, *advice)  # 500,000 diverges too: what counts is that the command is taken
    assert "diverged at epoch 1" in followed.stderr and "cannot" not in followed.stderr
    assert json.loads(Path(f"{out}-lr500000", "config.json").read_text())["lr"] == 500000


def test_a_loss_diverging_after_epoch_1_keeps_that_checkpoint_and_a_resume_does_not_change_lr(tmp_path, mnist_root):
    # One step per epoch: epoch 1 computes its loss with the initial weights, then a first Adam
    # step of lr/25 = 40,000 throws them far away; epoch 2's first loss diverges.
    out = tmp_path / "r"
    flags = ["--lr", "1e6", "--epochs", "3", "--train-limit", "64", "--batch-size", "64", "--test-limit", "200",
             "--data-dir", str(mnist_root), "--output-dir", str(out)]
    result = train(*flags)
    assert result.returncode == 2 and "the loss diverged at epoch 2, by step 1 of 1" in result.stderr
    kept = out / "checkpoints" / "epoch_0001"
    assert load_net(kept / "model.safetensors") is not None  # the weights load
    again = train(*flags, "--resume")  # and the whole state resumes, diverging again in epoch 2
    assert "resumed from" in again.stdout and "after epoch 1" in again.stdout
    assert again.returncode == 2 and "diverged at epoch 2" in again.stderr
    # Its advice starts anew, without --resume: a lower --lr is another trajectory.
    assert "the same command without --resume, plus --lr 500000 --output-dir" in again.stderr


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


@pytest.fixture(scope="module")
def mountable(tmp_path_factory) -> None:
    """These tests mount a tmpfs, which takes root with CAP_SYS_ADMIN (a container may drop it): tried once.
    Skipped where it is refused, but under CI, which runs as root with it, that is a failure."""
    folder = tmp_path_factory.mktemp("mount-check")
    tried = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(folder)], capture_output=True, text=True)
    if tried.returncode == 0:
        subprocess.run(["umount", str(folder)], check=True)
        return
    message = f"cannot mount a tmpfs here: {tried.stderr.strip() or 'mount failed'}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


needs_mount = pytest.mark.usefixtures("mountable")


@contextlib.contextmanager
def tmpfs(folder, size: str):
    """A tmpfs of `size` mounted at `folder` (created) for the block; yields remount(options)."""
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield lambda options: subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def pause_then(job: Job, change) -> None:
    """Once the job's paused trainer (PROBE_DO=PAUSE) says so, `change()` the world, and let it go on (SIGUSR2)."""
    pid = int(re.search(r"\(PID (\d+)\)", job.wait_for("probe: paused at"))[1])
    change()
    os.kill(pid, signal.SIGUSR2)


@needs_mount
def test_a_full_disk_is_one_error_naming_the_path_and_the_run_resumes_once_there_is_room(tmp_path, mnist_root):
    """The run folder on a tmpfs, filled up as epoch 2's checkpoint begins (the run pauses there) to less room than
    epoch 1's checkpoint took: whatever a checkpoint weighs, the second does not fit. On two processes: the main
    one fails to write, and both stop at once."""
    disk = tmp_path / "disk"
    with tmpfs(disk, "8m"):
        out, filler = disk / "run", disk / "filler"
        flags = ["--epochs", "3", "--train-limit", "256", "--test-limit", "100", "--target-acc", "100",
                 "--data-dir", str(mnist_root), "--output-dir", str(out)]
        cmd, env = launch_cmd(flags, processes=2)
        job = Job(cmd, {**env, **at(f"{SAVE}:2", "PAUSE")})

        def fill():
            first = sum(f.stat().st_size for f in (out / "checkpoints" / "epoch_0001").rglob("*") if f.is_file())
            filler.write_bytes(bytes(max(0, shutil.disk_usage(disk).free - first // 2)))
        pause_then(job, fill)
        stderr = job.finish(deadline=120)
        assert job.process.returncode != 0, stderr[-3000:]
        assert not re.search(r'File ".*mnist_dist/\w+\.py"', stderr)  # no traceback of ours (the launcher adds its own)
        assert stderr.count("mnist_dist: error: cannot write the checkpoint") == 1, stderr[-3000:]
        assert f"'{out / 'checkpoints' / 'epoch_0002'}'" in stderr and "KiB left on that disk" in stderr
        assert f"The last complete checkpoint is '{out / 'checkpoints' / 'epoch_0001'}'" in stderr
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0001"]  # no .partial left

        filler.unlink()  # there is room: the advice, followed to the letter
        resumed = launch(flags + ["--resume", str(out / "checkpoints" / "epoch_0001")], processes=2, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        assert [e["epoch"] for e in json.loads((out / "metrics.json").read_text())["epochs"]] == [1, 2, 3]


@needs_mount
def test_a_log_write_failing_mid_epoch_stops_every_rank_at_once_and_the_run_resumes(tmp_path, mnist_root):
    """The run folder turns read-only 10 steps into epoch 2 (the run pauses there), as a full disk or a lost mount
    does: the main process's next TensorBoard write fails, and both ranks stop at a poll, with one message
    naming the checkpoint to resume from, instead of a traceback and the other rank waiting for --timeout."""
    disk = tmp_path / "disk"
    with tmpfs(disk, "8m") as remount:
        out = disk / "run"
        flags = ["--epochs", "2", "--train-limit", "3000", "--test-limit", "500", "--target-acc", "100",
                 "--data-dir", str(mnist_root), "--output-dir", str(out)]
        cmd, env = launch_cmd(flags, processes=2)
        job = Job(cmd, {**env, **at(f"{POLL}:4", "PAUSE")})  # 24 steps an epoch, polled at 10, 20, 24: epoch 2, step 10
        pause_then(job, lambda: remount("ro"))
        output = job.finish(deadline=120)
        assert job.process.returncode != 0, output[-3000:]
        assert output.count("mnist_dist: error: cannot write the trackers' logs") == 1, output[-3000:]
        assert f"continue with --resume {out / 'checkpoints' / 'epoch_0001'}." in output
        # No exception of ours escaped (TensorBoard's writer thread prints its own, which may show our
        # log() frame: that is where its error surfaced).
        assert not re.search(r'File ".*mnist_dist/train\.py", line \d+, in main', output)
        remount("rw")  # it can be written: the advice, followed to the letter
        resumed = launch(flags + ["--resume", str(out / "checkpoints" / "epoch_0001")], processes=2, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        assert [e["epoch"] for e in json.loads((out / "metrics.json").read_text())["epochs"]] == [1, 2]


@needs_mount
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


def test_cuda_graphs_on_the_cpu_are_refused_in_one_line_before_the_run_folder_is_claimed(tmp_path, mnist_root):
    out = tmp_path / "r"
    result = train("--cuda-graphs", "--data-dir", str(mnist_root), "--output-dir", str(out))
    assert result.returncode == 2 and result.stdout.count("\n") <= 1, result.stdout
    assert result.stderr.strip().splitlines() == [
        "mnist_dist: error: --cuda-graphs needs a CUDA device and no --sync-bn across processes; this run has cpu."]
    assert not (out / "config.json").exists()
    both = train("--cuda-graphs", "--compile", "--data-dir", str(mnist_root), "--output-dir", str(out))
    assert both.returncode == 2 and "choose one" in both.stderr


def test_fp8_is_refused_before_anything_is_written_and_its_advice_trains(tmp_path, mnist_root):
    """Accelerate converts only Linear and LayerNorm layers to fp8, and this network has neither: with the libraries
    for fp8 installed the run would train in fp32 under the name fp8. Refused from the flag and from the launcher."""
    out = tmp_path / "r"
    flags = ["--epochs", "1", "--train-limit", "128", "--test-limit", "100", "--data-dir", str(mnist_root),
             "--output-dir", str(out)]
    for how in (["--mixed-precision", "fp8"], []):
        result = run([sys.executable, "-m", "mnist_dist.train", *flags, *how], timeout=300,
                     env={} if how else {"ACCELERATE_MIXED_PRECISION": "fp8"})
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("mnist_dist: error: fp8 mixed precision would train")
        assert not out.exists()
    followed = train(*flags, "--mixed-precision", "bf16")  # "Use --mixed-precision bf16"
    assert followed.returncode == 0, followed.stderr
    assert json.loads((out / "config.json").read_text())["mixed_precision"] == "bf16"


def test_a_mid_epoch_checkpoint_past_a_smaller_epochs_is_refused_and_its_advice_finishes(tmp_path, mnist_root):
    """A checkpoint saved 10 steps into epoch 2, resumed with --epochs 1, would end the run on part-trained weights
    under epoch 1's metrics."""
    out = tmp_path / "r"
    flags = ["--train-limit", "1280", "--test-limit", "100", "--target-acc", "100", "--data-dir", str(mnist_root),
             "--output-dir", str(out)]
    stopped = run([sys.executable, "-m", "mnist_dist.train", *flags, "--epochs", "3"], timeout=300,
                  env=at(f"{POLL}:3", "TERM>self"))  # 20 steps an epoch, polled at 10 and 20: epoch 2, step 10
    assert stopped.returncode == 143, stopped.stderr
    saved = out / "checkpoints" / "epoch_0001_step_00010"
    assert f"saved {saved}" in stopped.stderr
    refused = train(*flags, "--epochs", "1", "--resume", str(saved))
    assert refused.returncode == 2
    assert "saved 10 steps into epoch 2, past --epochs 1" in refused.stderr
    assert "Resume it with --epochs 2 or more." in refused.stderr
    followed = train(*flags, "--epochs", "2", "--resume", str(saved))
    assert followed.returncode == 0, followed.stderr
    assert [e["epoch"] for e in json.loads((out / "metrics.json").read_text())["epochs"]] == [1, 2]

