"""--eval-every: evaluations within an epoch, a stop at a fractional epoch, and a trajectory they leave alone."""
import sys

import pytest
import torch
from safetensors.torch import load_file

from mnist_dist.errors import RunError
from mnist_dist.metrics import epoch_label, evaluation_points, met
from mnist_dist.settings import Settings

from conftest import POLL, at, launch, read_metrics, run, scalars

# 1280 training images in steps of 64: 20 steps an epoch, an evaluation at step 10 of each with --eval-every 0.5.
FLAGS = ["--train-limit", "1280", "--test-limit", "301", "--epochs", "2"]
TIMING = {"seconds", "train_seconds", "elapsed"}


def train(*args, env=None):
    return run([sys.executable, "-m", "mnist_dist.train", *args], timeout=300, env=env)


def rows(out) -> list[dict]:
    return [{k: v for k, v in e.items() if k not in TIMING} for e in read_metrics(out)["epochs"]]


def test_the_points_of_an_epoch_and_their_labels():
    assert evaluation_points(938, 1.0) == {}
    assert evaluation_points(938, 0.5) == {469: 0.5}
    assert evaluation_points(469, 0.5) == {234: 0.5}  # two processes: the nearest step, labelled as the half
    assert evaluation_points(10, 0.25) == {2: 0.25, 5: 0.5, 8: 0.75}
    assert evaluation_points(1, 0.5) == {}  # no step inside an epoch of one
    assert epoch_label(3, 0.5) == 3.5 and epoch_label(3, 1) == 4 and isinstance(epoch_label(3, 1), int)
    assert epoch_label(0, 1 / 3) == 0.3333


def test_the_target_counts_only_when_no_step_was_taken_since_the_row():
    row = {"epoch": 1.5, "step": 30, "val_correct": 995, "val_total": 1000}
    assert met([row], 30, 20, 99.5) and not met([row], 31, 20, 99.5) and not met([row], 30, 20, 99.6)
    assert met([{"epoch": 2, "val_correct": 995, "val_total": 1000}], 40, 20, 99.5)  # a row saved before rows had steps


@pytest.mark.parametrize("every", [0.0, 0.3, 1.5])
def test_an_interval_that_does_not_divide_an_epoch_is_refused(every):
    with pytest.raises(RunError, match="--eval-every is a fraction of an epoch that divides it evenly"):
        Settings(eval_every=every, report_to="none").check()


@pytest.mark.parametrize("processes, extra", [(1, ["--ema", "0"]), (2, [])], ids=["trained-weights", "2-processes-average"])
def test_evaluations_within_epochs_leave_training_to_the_bit(tmp_path, mnist_root, processes, extra):
    """The same weights, averaged and trained, and the same epoch-end rows with and without the half-epoch
    evaluations: the evaluation's loader draws no number from training's stream, and the network scored itself
    (--ema 0) goes back to training mode. The extra rows split each epoch's training figures in two."""
    flags = [*FLAGS, "--target-acc", "100", "--report-to", "none", "--data-dir", str(mnist_root), *extra]
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    for out, every in ((whole, "1"), (halves, "0.5")):
        done = launch([*flags, "--eval-every", every, "--output-dir", str(out)], processes=processes, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    for name in ("model.safetensors", "checkpoints/epoch_0002/model.safetensors"):
        a, b = load_file(whole / name), load_file(halves / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    steps = 20 // processes
    assert [(e["epoch"], e["step"]) for e in rows(halves)] == [(0.5, steps // 2), (1, steps), (1.5, steps + steps // 2),
                                                               (2, 2 * steps)]
    same = ("val_loss", "val_acc", "val_correct", "val_total", "step")
    assert [{k: e[k] for k in same} for e in rows(halves)[1::2]] == [{k: e[k] for k in same} for e in rows(whole)]
    assert [a["train_images"] + b["train_images"] for a, b in zip(rows(halves)[::2], rows(halves)[1::2])] == \
        [e["train_images"] for e in rows(whole)]


@pytest.fixture(scope="module")
def history(tmp_path_factory, mnist_root):
    """Every half-epoch row of a 2-epoch run that never stops (target 100)."""
    out = tmp_path_factory.mktemp("history") / "run"
    done = train(*FLAGS, "--target-acc", "100", "--eval-every", "0.5", "--report-to", "none", "--data-dir",
                 str(mnist_root), "--output-dir", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return read_metrics(out)["epochs"]


def test_a_run_stops_at_the_half_epoch_that_reaches_the_target_and_says_so(tmp_path, mnist_root, history):
    """The target set to what the run scores at 1.5 (or 0.5, if 1.5 is no better than the rows before it): the run
    stops there, as a fractional epoch in the log, metrics.json, TensorBoard and a checkpoint of that step; a resume
    of the finished run trains nothing and keeps its one history."""
    best = lambda i: all(history[i]["val_acc"] > e["val_acc"] for e in history[:i])  # noqa: E731
    stop = 2 if best(2) else 0
    target, label = history[stop]["val_acc"], history[stop]["epoch"]
    out = tmp_path / "run"
    flags = [*FLAGS, "--target-acc", str(target), "--eval-every", "0.5", "--data-dir", str(mnist_root),
             "--output-dir", str(out)]
    done = train(*flags)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"epoch {label}/2 " in done.stdout and f"reached {target}%: epoch {label}," in done.stdout
    metrics = read_metrics(out)
    assert metrics["reached_target"] and metrics["stop_epoch"] == label and metrics["final_val_acc"] == target
    assert [{k: v for k, v in e.items() if k not in TIMING} for e in history[:stop + 1]] == rows(out)
    assert (out / "checkpoints" / f"epoch_{int(label):04d}_step_{history[stop]['step'] % 20:05d}").is_dir()
    assert scalars(out, "epoch")[history[stop]["step"]] == label
    again = train(*flags, "--resume")
    assert again.returncode == 0 and f"reached {target}%: epoch {label}," in again.stdout, again.stderr[-3000:]
    assert rows(out) == [{k: v for k, v in e.items() if k not in TIMING} for e in history[:stop + 1]]


def test_a_signal_at_a_half_epoch_keeps_its_row_and_the_resumed_run_one_history(tmp_path, mnist_root, history):
    """SIGTERM at step 10 of epoch 2, the step of the 1.5 evaluation: the evaluation comes before the poll that
    sees the signal, so the checkpoint holds that row and the resumed run adds only what followed it."""
    out = tmp_path / "run"
    flags = [*FLAGS, "--target-acc", "100", "--eval-every", "0.5", "--report-to", "none", "--data-dir",
             str(mnist_root), "--output-dir", str(out)]
    stopped = train(*flags, env=at(f"{POLL}:3", "TERM>self"))
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert (out / "checkpoints" / "epoch_0001_step_00010").is_dir()
    resumed = train(*flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [e["epoch"] for e in rows(out)] == [0.5, 1, 1.5, 2]
    assert rows(out)[:3] == [{k: v for k, v in e.items() if k not in TIMING} for e in history[:3]]
