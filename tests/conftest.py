"""Shared pieces: the real MNIST files prepared once, and running the program as a user does."""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mnist_dist.data import DeviceMNIST, load_tensors, prepare_mnist
from mnist_dist.model import Net

REPO = Path(__file__).resolve().parents[1]
PROBE = str(REPO / "tests" / "probe")  # PYTHONPATH for tests/probe/sitecustomize.py
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
os.environ["PATH"] = f"{Path(ACCELERATE).parent}{os.pathsep}{os.environ['PATH']}"  # the scripts in launch/ find it
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


STARTED: list[subprocess.Popen] = []  # this test's commands, each the leader of its own process group


@pytest.fixture(autouse=True)
def kill_what_the_test_started():
    """However a test ends, every process it started is killed with its group: launchers, trainers, workers."""
    yield
    while STARTED:
        job = STARTED.pop()
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except ProcessLookupError:  # the whole group is gone
            pass
        job.wait()


def popen(cmd: list[str], env: dict | None = None, cwd: Path = REPO, **kw) -> subprocess.Popen:
    """Start a command in its own session, killed with its group when the test ends. `env` adds to this
    process's environment; a variable given as None is left out."""
    full = {k: v for k, v in {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}.items() if v is not None}
    job = subprocess.Popen(cmd, cwd=cwd, env=full, text=True, start_new_session=True, **kw)
    STARTED.append(job)
    return job


def run(cmd: list[str], timeout: float = 600, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run a command from the repository root, capturing text output; an AssertionError past `timeout` s."""
    job = popen(cmd, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    try:
        out, err = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        out, err = job.communicate()
        raise AssertionError(f"{' '.join(map(str, cmd))} ran past its {timeout} s deadline\n{(out + err)[-3000:]}")
    return subprocess.CompletedProcess(cmd, job.returncode, out, err)


class Job:
    """A command running in the background, stdout and stderr merged, read as it comes with deadlines."""

    def __init__(self, cmd: list[str], env: dict | None = None, cwd: Path = REPO):
        self.process = popen(cmd, env, cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.lines.append(None)  # end of output: every process holding it is gone
            self.changed.notify_all()

    def wait_for(self, text: str, deadline: float = 300) -> str:
        """The first line holding `text`; an AssertionError, with the output, if the output ends or `deadline` s
        pass first."""
        end = time.monotonic() + deadline
        with self.changed:
            while True:
                found = next((x for x in self.lines if x and text in x), None)
                if found or None in self.lines or time.monotonic() > end:
                    break
                self.changed.wait(timeout=max(0.0, end - time.monotonic()))
        assert found, f"no '{text}' within {deadline} s\n{self.output[-3000:]}"
        return found

    def finish(self, deadline: float = 300) -> str:
        """The whole output, once the command and every process holding its output have ended."""
        try:
            self.process.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{' '.join(map(str, self.process.args))} ran past its {deadline} s deadline\n"
                                 f"{self.output[-3000:]}") from None
        with self.changed:
            if not self.changed.wait_for(lambda: None in self.lines, timeout=deadline):
                raise AssertionError(f"processes outlived the command by {deadline} s\n{self.output[-3000:]}")
        return self.output

    @property
    def output(self) -> str:
        return "".join(x for x in self.lines if x)


def launch_cmd(args: list[str], processes: int = 1) -> tuple[list[str], dict]:
    """(command, environment) of the training launched as the README says: launch/cpu.sh (one process with
    the project config) or launch/cpu_multi.sh (gloo CPU processes). Both exec `accelerate launch`."""
    if processes == 1:
        return [str(REPO / "launch" / "cpu.sh"), *args], {}
    return [str(REPO / "launch" / "cpu_multi.sh"), *args], {"NPROC": str(processes)}


def launch(args: list[str], processes: int = 1, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd, launch_env = launch_cmd(args, processes)
    return run(cmd, timeout=timeout, env={**launch_env, **(env or {})})


POLL = "call:mnist_dist.poll.poll"  # every 10 steps: f"{POLL}:2" is step 20 of epoch 1
SAVE = "call:accelerate.accelerator.save_state"  # each checkpoint


def at(when: str, do: str, rank: int = 0) -> dict:
    """The environment of a fault sent by the run itself (tests/probe/sitecustomize.py): `do` ("SIGNAL>TARGET")
    once rank `rank` reaches `when`, so that it lands at the same step on a machine of any speed."""
    return {"PYTHONPATH": PROBE, "PROBE_AT": when, "PROBE_DO": do, "PROBE_RANK": str(rank)}


def wait_until(what: str, test, deadline: float = 300, every: float = 0.05):
    """Poll `test()` for a state (not a time) until it returns something true, and return that; an
    AssertionError naming `what` past `deadline` s."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if result := test():
            return result
        time.sleep(every)
    raise AssertionError(f"timed out after {deadline} s waiting for {what}")


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
