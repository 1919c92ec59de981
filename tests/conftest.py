"""Shared pieces: the real MNIST files prepared once, and running the program as a user does."""
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mnist_dist.data import DeviceMNIST, load_tensors, prepare_mnist
from mnist_dist.model import Net

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
# A home of the suite's own: `accelerate launch` with no config must not find the user's default_config.yaml.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="mnist_dist-tests-hf-")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two test files run at a time (pytest-xdist), so each program started here gets one thread, as
    # OMP_NUM_THREADS gives it to a user who shares a machine: by default a trainer takes every core,
    # and two of them spinning on the same cores run several times slower. The default is tested in
    # test_train.py, with a clean environment.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """A torchvision MNIST root filled from the offline copy (no network)."""
    return prepare_mnist(tmp_path_factory.mktemp("data"), download=False)


def run(cmd: list[str], timeout: float = 600, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run a command from the repository root, capturing text output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout, **kw)


def launch_cmd(args: list[str], processes: int = 1) -> tuple[list[str], dict]:
    """(command, environment) of `accelerate launch -m mnist_dist.train ARGS`: the project config for
    one process, gloo CPU processes (as launch/cpu_multi.sh) for several."""
    if processes == 1:
        return [ACCELERATE, "launch", "-q", "--config_file", "accelerate_config.yaml", "-m", "mnist_dist.train", *args], {}
    return ([ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--main_process_port", "0",
             "-m", "mnist_dist.train", *args], {"ACCELERATE_USE_CPU": "1"})


def launch(args: list[str], processes: int = 1, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd, launch_env = launch_cmd(args, processes)
    return run(cmd, timeout=timeout, env={**launch_env, **(env or {})})


def start(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    """Start a command in the background, stdout and stderr merged, and wait until training runs."""
    job = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in job.stdout:
        if "steps/epoch" in line:  # training has started
            return job
    raise AssertionError(f"training never started (exit {job.wait()})")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """A TensorBoard scalar series of a run, step -> value, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series = {}
    for folder in sorted({p.parent for p in run_dir.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(folder))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            series.update({e.step: e.value for e in acc.Scalars(tag)})
    return series


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def count_correct(weights: Path, root: Path, limit: int) -> int:
    """Correct predictions of saved weights on the first `limit` test images, in this one process."""
    net = Net()
    net.load_state_dict(load_file(weights))
    net.eval()
    ds = DeviceMNIST(*load_tensors(root, train=False, limit=limit), "cpu")
    with torch.inference_mode():
        return int((net(ds.x).argmax(1) == ds.y).sum())


def write_idx(root: Path, images: torch.Tensor, labels: torch.Tensor) -> Path:
    """Write uint8 (N, 28, 28) images and labels as both MNIST splits, uncompressed, in torchvision's layout."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    n = len(images).to_bytes(4, "big")
    for split in ("train", "t10k"):
        (raw / f"{split}-images-idx3-ubyte").write_bytes(
            (2051).to_bytes(4, "big") + n + (28).to_bytes(4, "big") * 2 + images.to(torch.uint8).numpy().tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(
            (2049).to_bytes(4, "big") + n + labels.to(torch.uint8).numpy().tobytes())
    return root
