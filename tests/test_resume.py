"""Never lose a run: epoch checkpoints, exact resume, extended runs, refused resumes, SIGTERM."""
import math
import signal
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_metrics, run, scalars, start

TIMING = {"seconds", "train_seconds", "elapsed"}


def train(*args) -> "subprocess.CompletedProcess":  # noqa: F821
    return run([sys.executable, "-m", "mnist_dist.train", *args], timeout=300)


def same_run(a, b) -> bool:
    """Bit-identical weights and the same history but for timings."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    strip = lambda m: [{k: v for k, v in e.items() if k not in TIMING} for e in m["epochs"]]  # noqa: E731
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa) and \
        strip(read_metrics(a)) == strip(read_metrics(b))


def test_a_finished_run_extended_is_bit_identical_to_one_planned_that_long(tmp_path, mnist_root):
    """--epochs 2 plans a 2-epoch cycle (the default --schedule-epochs 5, cut to the run). Resumed with
    --epochs 4, the run keeps that cycle and goes on with warm restarts (a cosine from 0.1 x lr each
    epoch): the same weights and history as a run planned as 4 epochs with a 2-epoch cycle."""
    flags = ["--train-limit", "1280", "--test-limit", "200", "--target-acc", "100", "--data-dir", str(mnist_root)]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train(*flags, "--epochs", "4", "--schedule-epochs", "2", "--output-dir", str(whole)).returncode == 0
    assert train(*flags, "--epochs", "2", "--output-dir", str(split)).returncode == 0
    first = read_metrics(split)["epochs"]
    (split / "checkpoints" / ".partial-epoch_0003").mkdir()  # left by a save that was killed
    resumed = train(*flags, "--epochs", "4", "--resume", str(split))  # the run folder: its newest checkpoint
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "after epoch 2" in resumed.stdout
    assert "Traceback" not in resumed.stderr
    history = read_metrics(split)["epochs"]
    assert [e["epoch"] for e in history] == [1, 2, 3, 4] and history[:2] == first
    assert same_run(whole, split)
    lr = scalars(split, "step/lr")  # logged every 10 steps; 20 steps an epoch
    assert lr[50] == pytest.approx(0.0015 * 0.5 * (1 + math.cos(math.pi * 9 / 20)))
    assert lr[80] == pytest.approx(0.0015 * 0.5 * (1 + math.cos(math.pi * 19 / 20)))
    assert sorted(p.name for p in (split / "checkpoints").iterdir()) == ["epoch_0003", "epoch_0004"]  # keep 2


def test_a_resume_that_would_change_the_trajectory_is_refused_before_anything_is_written(tmp_path, mnist_root):
    out = tmp_path / "run"
    flags = ["--epochs", "1", "--train-limit", "640", "--test-limit", "100", "--data-dir", str(mnist_root),
             "--output-dir", str(out)]
    assert train(*flags).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    for change, says in ((["--lr", "0.02"], "lr (saved 0.015, given 0.02)"),
                         (["--batch-size", "32"], "batch-size (saved 64, given 32)")):
        refused = train(*flags[:-2], "--epochs", "2", *change, "--output-dir", str(out), "--resume")
        assert refused.returncode == 2 and says in refused.stderr and "Traceback" not in refused.stderr
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_sigterm_saves_a_checkpoint_and_the_run_resumes_to_the_end(tmp_path, mnist_root):
    out = tmp_path / "run"
    flags = ["--train-limit", "3000", "--test-limit", "200", "--epochs", "2", "--target-acc", "100",
             "--data-dir", str(mnist_root), "--output-dir", str(out)]
    job = start([sys.executable, "-m", "mnist_dist.train", *flags])
    job.send_signal(signal.SIGTERM)
    output, _ = job.communicate(timeout=120)
    assert job.returncode == 143, output
    assert "stopped by SIGTERM" in output and "--resume" in output and "Traceback" not in output
    saved = list((out / "checkpoints").glob("epoch_0000_step_*"))
    assert len(saved) == 1 and not (out / "metrics.json").exists()

    resumed = train(*flags, "--resume", str(saved[0]))
    assert resumed.returncode == 0, resumed.stderr
    m = read_metrics(out)
    # One continuous history: both epochs, the first one counting every image once.
    assert [e["epoch"] for e in m["epochs"]] == [1, 2]
    assert [e["train_images"] for e in m["epochs"]] == [3000, 3000]
    assert m["epochs"][1]["train_loss"] < m["epochs"][0]["train_loss"]
