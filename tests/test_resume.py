"""Never lose a run: epoch checkpoints, exact resume, and stopping on SIGTERM."""
import os
import signal
import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import REPO, read_metrics, run

TIMING = {"seconds", "train_seconds", "elapsed"}


def train(*args) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "mnist_dist.train", *args], timeout=300)


def test_stopped_then_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, mnist_root):
    flags = ["--train-limit", "1500", "--test-limit", "500", "--batch-size", "256", "--schedule-epochs", "2",
             "--target-acc", "100", "--data-dir", str(mnist_root)]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train(*flags, "--epochs", "3", "--output-dir", str(whole)).returncode == 0
    assert train(*flags, "--epochs", "2", "--output-dir", str(split)).returncode == 0
    resumed = train(*flags, "--epochs", "3", "--output-dir", str(split), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "after epoch 2" in resumed.stdout

    a, b = load_file(whole / "model.safetensors"), load_file(split / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda m: [{k: v for k, v in e.items() if k not in TIMING} for e in m["epochs"]]  # noqa: E731
    assert strip(read_metrics(whole)) == strip(read_metrics(split))
    assert [e["epoch"] for e in read_metrics(split)["epochs"]] == [1, 2, 3]
    assert sorted(p.name for p in (split / "checkpoints").iterdir()) == ["epoch_0002", "epoch_0003"]  # keep 2


def test_sigterm_saves_a_checkpoint_and_the_run_resumes_to_the_end(tmp_path, mnist_root):
    out = tmp_path / "run"
    flags = ["--train-limit", "12000", "--test-limit", "1000", "--epochs", "2", "--target-acc", "100",
             "--data-dir", str(mnist_root), "--output-dir", str(out)]
    job = subprocess.Popen([sys.executable, "-m", "mnist_dist.train", *flags], cwd=REPO, text=True,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in job.stdout:
        if "steps/epoch" in line:  # training has started
            break
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 143, err
    assert "stopped by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    saved = list((out / "checkpoints").glob("epoch_0000_step_*"))
    assert len(saved) == 1 and not (out / "metrics.json").exists()

    resumed = train(*flags, "--resume", str(saved[0]))
    assert resumed.returncode == 0, resumed.stderr
    m = read_metrics(out)
    # One continuous history: both epochs, the first one counting every image once.
    assert [e["epoch"] for e in m["epochs"]] == [1, 2]
    assert [e["train_images"] for e in m["epochs"]] == [12000, 12000]
    assert m["epochs"][1]["train_loss"] < m["epochs"][0]["train_loss"]
