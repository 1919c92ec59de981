"""Never lose a run: epoch checkpoints, exact resume, extended runs, refused resumes, SIGTERM."""
import dataclasses
import math
import sys

import pytest
import torch
from safetensors.torch import load_file

from mnist_dist.checkpoint import PROGRESS, TRAJECTORY, find
from mnist_dist.manifest import seal
from mnist_dist.errors import RunError
from mnist_dist.settings import Settings

from conftest import POLL, at, read_metrics, run, scalars

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
    stopped = run([sys.executable, "-m", "mnist_dist.train", *flags], env=at(f"{POLL}:1", "TERM>self"))
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    saved = out / "checkpoints" / "epoch_0000_step_00010"  # the signal came at step 10's poll
    assert f"mnist_dist: stopped by SIGTERM; saved {saved}. Continue with the same command plus --resume {saved}" \
        in stopped.stderr and "Traceback" not in stopped.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == [saved.name] and not (out / "metrics.json").exists()

    resumed = train(*flags, "--resume", str(saved))
    assert resumed.returncode == 0, resumed.stderr
    m = read_metrics(out)
    # One continuous history: both epochs, the first one counting every image once.
    assert [e["epoch"] for e in m["epochs"]] == [1, 2]
    assert [e["train_images"] for e in m["epochs"]] == [3000, 3000]
    assert m["epochs"][1]["train_loss"] < m["epochs"][0]["train_loss"]


def test_a_resumed_run_that_met_its_target_trains_no_further(tmp_path, mnist_root):
    out = tmp_path / "run"
    flags = ["--train-limit", "640", "--test-limit", "100", "--target-acc", "5", "--data-dir", str(mnist_root),
             "--output-dir", str(out)]
    assert train(*flags, "--epochs", "1").returncode == 0
    first = read_metrics(out)
    resumed = train(*flags, "--epochs", "3", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "after epoch 1" in resumed.stdout and "epoch  2/3" not in resumed.stdout
    again = read_metrics(out)
    assert again["epochs"] == first["epochs"] and again["stop_epoch"] == 1 and again["reached_target"]


# Settings a resume may change, and why. Every other one fixes the trajectory (checkpoint.TRAJECTORY).
MAY_CHANGE = {
    "epochs": "a run may be extended", "target_acc": "or its target moved",
    "global_batch_size": "resolved into batch_size, which is checked", "eval_batch_size": "the same counts",
    "data_dir": "the same files anywhere", "output_dir": "where the run is", "resume": "how to find it",
    "config": "read into the other settings", "report_to": "where it is logged",
    "keep_checkpoints": "how many are kept", "timeout": "how long a collective waits",
    "start_timeout": "how long the start may wait",
    "compile": "the same network, compiled", "cuda_graphs": "the same kernels, replayed",
    "eval_every": "when the run is scored, not what it trains (tests/test_eval_within.py)"}


def test_every_setting_either_fixes_the_trajectory_or_may_change_on_resume():
    fields = {f.name for f in dataclasses.fields(Settings)}
    fixed = set(TRAJECTORY) - {"world_size"}  # world_size is the launch's, not a setting
    assert fixed | MAY_CHANGE.keys() == fields and not fixed & MAY_CHANGE.keys()


def test_every_trajectory_setting_is_refused_on_resume(tmp_path):
    saved = {**dataclasses.asdict(Settings()), "world_size": 1, "mixed_precision": "no"}
    saved = {k: saved[k] for k in TRAJECTORY}
    folder = tmp_path / "checkpoints" / "epoch_0001"
    folder.mkdir(parents=True)
    torch.save({"trajectory": saved}, folder / PROGRESS)
    torch.save({}, folder / "random_states_0.pkl")
    assert seal(folder) is None  # its manifest.json: a checkpoint known to be whole
    assert find("latest", tmp_path, saved) == folder
    for key, value in saved.items():
        other = (not value) if isinstance(value, bool) else value + (1 if isinstance(value, (int, float)) else "x")
        with pytest.raises(RunError, match=f"with other settings: {key.replace('_', '-')} \\(saved {value!r}, "
                                           f"given {other!r}\\)"):
            find("latest", tmp_path, {**saved, key: other})
