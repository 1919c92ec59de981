"""macOS and Windows, as far as Linux can stand in for them: the program run with the Linux-only calls taken away
(tests/platform_probe/sitecustomize.py) trains, uses every core, prepares its data under a lock, and leaves glibc's
allocator alone. Not simulated: Windows' own lock (msvcrt; filelock falls back to its lock file here), signals, MPS."""
import json
import os
import sys

import pytest

from conftest import REPO, read_metrics, run

PROBE = REPO / "tests" / "platform_probe"


@pytest.mark.parametrize("system", ["macos", "windows"])
def test_training_runs_without_linux_only_calls(tmp_path, monkeypatch, system):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the trainer counts the cores itself
    out, data, log = tmp_path / "run", tmp_path / "data", tmp_path / "probe.log"
    # A fresh data folder: prepare_mnist copies the offline files in under its lock.
    result = run([sys.executable, "-m", "mnist_dist.train", "--epochs", "1", "--train-limit", "256",
                  "--test-limit", "100", "--data-dir", str(data), "--output-dir", str(out)], timeout=300,
                 env={"PYTHONPATH": str(PROBE), "PLATFORM_PROBE": system, "PLATFORM_PROBE_LOG": str(log)})
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    called = log.read_text().splitlines()
    assert called[0] == system and "libc.so.6" not in called  # the probe ran; mallopt is glibc's alone
    assert json.loads((out / "config.json").read_text())["threads"] == os.cpu_count()
    assert read_metrics(out)["epochs"][0]["train_images"] == 256
    assert (data / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()
