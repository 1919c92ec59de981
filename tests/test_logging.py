"""What the trackers receive, offline: W&B through `accelerate launch`, every tracker on the global optimizer step,
and a resumed run logging each step once (TensorBoard's own reader, W&B's offline files)."""
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from conftest import POLL, Job, at, launch, read_metrics, run

# 1,280 images in batches of 64: 20 optimizer steps an epoch, polled (step/loss) every 10.
FLAGS = ["--train-limit", "1280", "--test-limit", "200", "--target-acc", "100", "--rotation", "0", "--shift", "0",
         "--report-to", "tensorboard,wandb"]
OFFLINE = {"WANDB_MODE": "offline"}


def wandb_runs(folder: Path) -> list[dict]:
    """Every W&B run written offline under `folder`, oldest first: its id, project, name, history rows and the
    step metric of each defined metric. W&B 0.31's Python package reads no .wandb file: each is a header (":W&B",
    magic, version) and a LevelDB-style log, blocks of 32 KiB holding (CRC, length, type, data) chunks of
    protobuf Records (type 1: whole; 2, 3, 4: first, middle and last part)."""
    runs = []
    for path in sorted(folder.rglob("offline-run-*/run-*.wandb")):
        data, pos, chunk = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B", path
        found = {"history": [], "metrics": {}}
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind not in (1, 4):
                continue
            record = wandb_internal_pb2.Record.FromString(chunk)
            chunk, field = b"", record.WhichOneof("record_type")
            if field == "run":
                found.update(id=record.run.run_id, project=record.run.project, name=record.run.display_name)
            elif field == "history":
                found["history"].append({"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                                         for i in record.history.item})
            elif field == "metric":
                found["metrics"][record.metric.name or record.metric.glob_name] = record.metric.step_metric
        runs.append(found)
    return runs


def steps_of(history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(row["_step"], row[key]) for row in history if key in row]


def tensorboard(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every event of `tag` that TensorBoard shows, duplicates included, in the order written."""
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def assert_no_dropped_records(wandb_dir: Path) -> None:
    logs = list(wandb_dir.rglob("debug-internal.log"))
    assert logs and not any("ignoring partial history record" in p.read_text() for p in logs)


def stop_in_epoch_2(args: list[str]) -> tuple[int, str]:
    """Run the trainer and have it send itself SIGTERM at its third poll (step 30, 10 steps into epoch 2): it
    stops there, at any speed. Returns (exit status, output)."""
    job = Job([sys.executable, "-m", "mnist_dist.train", *args], env={**OFFLINE, **at(f"{POLL}:3", "TERM>self")})
    output = job.finish()
    return job.process.returncode, output


def train(*args) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "mnist_dist.train", *FLAGS, *args], timeout=300, env=OFFLINE)


@pytest.fixture(scope="module")
def whole(tmp_path_factory, mnist_root) -> Path:
    """An uninterrupted 2-epoch run to compare resumed ones with."""
    out = tmp_path_factory.mktemp("whole") / "run"
    assert train("--epochs", "2", "--data-dir", str(mnist_root), "--output-dir", str(out)).returncode == 0
    return out


def test_wandb_offline_gets_every_epoch_on_the_step_axis_of_every_tracker(tmp_path, mnist_root):
    out, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    wandb_dir.mkdir()
    result = launch([*FLAGS, "--epochs", "2", "--data-dir", str(mnist_root), "--output-dir", str(out)],
                    env={**OFFLINE, "WANDB_DIR": str(wandb_dir)})
    assert result.returncode == 0 and "Traceback" not in result.stdout + result.stderr, result.stderr
    m = read_metrics(out)
    [w] = wandb_runs(wandb_dir)
    assert (w["project"], w["name"]) == ("mnist_dist", out.name)
    # Each epoch at its last optimizer step (20, 40), with the epoch as a value that W&B plots it against.
    expected = [(20 * e["epoch"], e["val_acc"]) for e in m["epochs"]]
    assert steps_of(w["history"], "val/acc") == expected == tensorboard(out, "val/acc")
    assert steps_of(w["history"], "epoch") == [(20, 1), (40, 2)]
    assert w["metrics"]["val/*"] == w["metrics"]["train/*"] == w["metrics"]["lr"] == "epoch"
    assert [s for s, _ in steps_of(w["history"], "step/loss")] == [10, 20, 30, 40]
    assert steps_of(w["history"], "hparam/final_val_acc") == [(40, m["final_val_acc"])]
    assert_no_dropped_records(wandb_dir)
    assert list(out.glob("tensorboard/events.out.tfevents.*")) and not (out / "wandb").exists()


def test_a_run_stopped_in_epoch_2_resumes_bit_identical_logging_each_step_once(whole, tmp_path, mnist_root):
    """Accelerate 1.15+ (huggingface/accelerate#4071): skipping the first batches of epoch 2 keeps epoch 2's
    shuffle; up to 1.14 it replayed epoch 0's order, and the weights differed."""
    out = tmp_path / "run"
    flags = ["--epochs", "2", "--data-dir", str(mnist_root), "--output-dir", str(out)]
    code, output = stop_in_epoch_2([*FLAGS, *flags])
    assert code == 143 and "stopped by SIGTERM" in output, output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_0001", "epoch_0001_step_00010"]
    resumed = train(*flags, "--resume")
    assert resumed.returncode == 0 and "after epoch 1, step 10" in resumed.stdout, resumed.stderr
    a, b = load_file(whole / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    m = read_metrics(out)
    expected = [(20 * e["epoch"], e["val_acc"]) for e in m["epochs"]]
    assert tensorboard(out, "val/acc") == expected
    assert [s for s, _ in tensorboard(out, "step/loss")] == [10, 20, 30, 40]
    first, second = wandb_runs(out / "wandb")  # W&B's folder is the run folder's, by default
    assert first["id"] == second["id"]  # one W&B run, continued
    history = first["history"] + second["history"]
    assert steps_of(history, "val/acc") == expected
    assert [s for s, _ in steps_of(history, "step/loss")] == [10, 20, 30, 40]
    assert_no_dropped_records(out / "wandb")


def test_steps_logged_after_the_last_checkpoint_are_replaced_not_repeated(whole, tmp_path, mnist_root):
    """A crash after step 30 of 40 whose last checkpoint is epoch 1's (step 20): the resumed run logs steps
    21-40 again. TensorBoard shows each once, the new values; W&B continues the same run."""
    out = tmp_path / "run"
    flags = ["--epochs", "2", "--data-dir", str(mnist_root), "--output-dir", str(out)]
    assert stop_in_epoch_2([*FLAGS, *flags])[0] == 143
    logged = tensorboard(out, "step/loss")
    assert [s for s, _ in logged] == [10, 20, 30]
    resumed = train(*flags, "--resume", str(out / "checkpoints" / "epoch_0001"))  # as if step 30's were lost
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(whole / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    m = read_metrics(out)
    for tag in ("step/loss", "step/lr", "val/acc", "train/loss", "epoch"):
        steps = [s for s, _ in tensorboard(out, tag)]
        assert len(steps) == len(set(steps)), (tag, steps)
    assert tensorboard(out, "step/loss")[:2] == logged[:2] and len(tensorboard(out, "step/loss")) == 4
    assert tensorboard(out, "val/acc") == [(20 * e["epoch"], e["val_acc"]) for e in m["epochs"]]
    first, second = wandb_runs(out / "wandb")
    assert first["id"] == second["id"]
    # W&B continues from the checkpoint's step: online it ignores what it already has (step 30, from before the crash).
    assert [s for s, _ in steps_of(second["history"], "step/loss")] == [30, 40]
