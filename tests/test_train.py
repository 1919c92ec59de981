"""The training program run as a user runs it, on a slice of real MNIST."""
import fcntl
import json
import math
import os
import pty
import select
import struct
import sys
import termios
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mnist_dist.metrics import reached

from conftest import ACCELERATE, count_correct, launch, popen, read_metrics, run

METRIC_KEYS = {"params", "target_acc", "reached_target", "stop_epoch", "world_size", "mixed_precision",
               "wall_seconds", "final_val_acc", "epochs"}
EPOCH_KEYS = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"}
SCALARS = {"train/loss", "train/acc", "val/loss", "val/acc", "lr"}


def tensorboard_tags(run_dir) -> dict[str, set[str]]:
    """Every tag in the run's event files, read with TensorBoard's own reader, by kind."""
    tags: dict[str, set[str]] = {}
    for folder in {p.parent for p in run_dir.rglob("events.out.tfevents.*")}:
        acc = EventAccumulator(str(folder), size_guidance={"images": 0})
        acc.Reload()
        for kind, names in acc.Tags().items():
            if isinstance(names, list):
                tags.setdefault(kind, set()).update(names)
        try:
            tags.setdefault("hparams", set()).update(acc.PluginTagToContent("hparams"))
        except KeyError:  # this folder holds no hparams
            pass
    return tags


def test_stop_rule_is_inclusive_and_exact():
    assert reached(9941, 10000, 99.41)
    assert not reached(9940, 10000, 99.41)
    assert reached(995, 1001, 99.4)  # 99.4006%
    assert not reached(994, 1001, 99.4)  # 99.3007%


def test_launch_one_process_writes_the_whole_run_folder(tmp_path, mnist_root):
    out = tmp_path / "run"
    result = launch(["--epochs", "2", "--schedule-epochs", "1", "--train-limit", "1280", "--test-limit", "301",
                     "--target-acc", "100", "--data-dir", str(mnist_root), "--output-dir", str(out)])
    assert result.returncode == 0, result.stderr
    assert "Trainable params: 9,720" in result.stdout
    assert "epoch  2/2" in result.stdout and "did not reach 100.0%" in result.stdout

    m = read_metrics(out)
    assert METRIC_KEYS <= m.keys()
    assert (m["params"], m["world_size"], m["stop_epoch"], m["reached_target"]) == (9720, 1, 2, False)
    assert [e["epoch"] for e in m["epochs"]] == [1, 2]
    assert all(EPOCH_KEYS <= e.keys() for e in m["epochs"])
    assert all(e["train_images"] == 1280 and e["val_total"] == 301 for e in m["epochs"])
    assert m["final_val_acc"] == m["epochs"][-1]["val_acc"]
    # Training learns something on 1,280 images in two epochs.
    assert m["epochs"][-1]["train_loss"] < m["epochs"][0]["train_loss"]

    tags = tensorboard_tags(out)
    assert SCALARS | {"step/loss", "step/lr", "hparam/final_val_acc"} <= tags["scalars"]
    assert {"test/mistakes", "test/confusion_matrix"} <= tags["images"]
    assert "model/summary/text_summary" in tags["tensors"]
    assert "_hparams_/experiment" in tags["hparams"]
    # Logged every 10 steps. The one-cycle schedule fills epoch 1 (20 steps of 64) and anneals;
    # epoch 2 anneals again, by a cosine from --tail-lr x --lr (0.1 x 0.015) to zero.
    acc = EventAccumulator(str(next(out.rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    lr = {e.step: e.value for e in acc.Scalars("step/lr")}
    assert sorted(lr) == [10, 20, 30, 40]
    assert lr[10] > lr[20]
    assert lr[30] == pytest.approx(0.0015 * 0.5 * (1 + math.cos(math.pi * 9 / 20)))
    assert lr[40] == pytest.approx(0.0015 * 0.5 * (1 + math.cos(math.pi * 19 / 20)))
    # The per-epoch scalars at each epoch's last step, beside the epoch itself.
    assert [(e.step, e.value) for e in acc.Scalars("epoch")] == [(20, 1), (40, 2)]
    assert [(e.step, e.value) for e in acc.Scalars("val/acc")] == [
        (20 * e["epoch"], pytest.approx(e["val_acc"])) for e in m["epochs"]]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "config.json").read_text())
    # The trainer records the threads it took (one here: the suite gives each program one) and says them.
    assert config["threads"] == int(os.environ.get("OMP_NUM_THREADS", CORES))
    assert f"{config['threads']} thread(s) each" in result.stdout
    # The reported accuracy is that of the saved weights, to the image.
    assert count_correct(out / "model.safetensors", mnist_root, 301) == m["epochs"][-1]["val_correct"]


def test_run_folder_holding_a_run_is_refused(tmp_path, mnist_root):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    result = launch(["--epochs", "1", "--data-dir", str(mnist_root), "--output-dir", str(out)])
    assert result.returncode != 0
    assert "already holds a run. To continue it, add --resume auto;" in result.stderr
    assert (out / "config.json").read_text() == "{}"
    # Followed to the letter: a folder whose run left no checkpoint starts that run again.
    followed = launch(["--epochs", "1", "--train-limit", "128", "--test-limit", "100", "--data-dir", str(mnist_root),
                       "--output-dir", str(out), "--resume", "auto"])
    assert followed.returncode == 0, followed.stderr
    assert read_metrics(out)["stop_epoch"] == 1


def test_val_split_on_two_processes_validates_on_held_out_training_images_and_tests_once(tmp_path, mnist_root):
    out = tmp_path / "run"
    result = launch(["--val-split", "500", "--epochs", "1", "--train-limit", "2000", "--test-limit", "300",
                     "--data-dir", str(mnist_root), "--output-dir", str(out)], processes=2)
    assert result.returncode == 0, result.stderr
    m = read_metrics(out)
    row = m["epochs"][0]
    # 1,500 images over 2 ranks x 64: 12 steps, the last padded with 36 repeats; the 500 validate exactly once.
    assert (row["val_total"], row["train_images"]) == (500, 12 * 128)
    assert m["validation"] == "500 held-out training images"
    assert 0 <= m["test_acc"] <= 100 and f"test acc {m['test_acc']:.2f}%" in result.stdout
    assert count_correct(out / "model.safetensors", mnist_root, 300) == round(m["test_acc"] * 3)


def test_a_terminal_gets_a_progress_bar_with_throughput(tmp_path, mnist_root):
    """On a terminal the main process draws a tqdm bar; in logs (the other tests) only plain lines appear."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # a terminal 160 columns wide
    cmd = [sys.executable, "-m", "mnist_dist.train", "--epochs", "1", "--train-limit", "1280", "--test-limit", "100",
           "--data-dir", str(mnist_root), "--output-dir", str(tmp_path / "run")]
    job = popen(cmd, stdout=terminal, stderr=terminal)
    os.close(terminal)
    seen, end = b"", time.monotonic() + 300
    while time.monotonic() < end:
        if not select.select([controller], [], [], max(0.0, end - time.monotonic()))[0]:
            continue  # the deadline passed: the assertions below fail
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the job closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    assert job.wait(timeout=1) == 0
    text = seen.decode(errors="replace")
    assert "epoch 1:" in text and "img_s=" in text and "acc=" in text
    assert "epoch  1/1" in text  # the plain line is printed as well


CORES = len(os.sched_getaffinity(0))
# What a trainer does with its threads before it trains, without the training: the launcher's start is the test.
THREADS = "from mnist_dist.distributed import set_threads\nprint('threads', set_threads(), flush=True)\n"


@pytest.mark.parametrize("launcher, env, expected", [
    ([], {}, CORES),  # no accelerate config: the launcher would say OMP_NUM_THREADS=1
    ([], {"OMP_NUM_THREADS": "1"}, 1),  # the user's choice, exported before the launch
    (["--num_cpu_threads_per_process", "1"], {}, 1),  # the user's choice, on the launcher's command line
    (["--multi_gpu", "--num_processes", "2", "--main_process_port", "0"], {"ACCELERATE_USE_CPU": "1"}, max(1, CORES // 2)),
])
def test_every_core_is_used_unless_the_user_chose_the_threads(tmp_path, launcher, env, expected):
    script = tmp_path / "threads.py"
    script.write_text(THREADS)
    result = run([ACCELERATE, "launch", "-q", *launcher, str(script)], timeout=120,
                 env={"OMP_NUM_THREADS": None, "ACCELERATE_USE_CPU": None, **env})
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split("\n")) - {""} == {f"threads {expected}"}


def test_the_torchvision_loader_scores_as_the_tensor_loader_does_and_report_to_none_logs_nothing(tmp_path, mnist_root):
    """Without augmentation both input paths serve the same normalised images in the same order: the same
    counts, and losses equal to float precision. `--report-to none` writes no tracker folder."""
    flags = ["--epochs", "1", "--train-limit", "1280", "--test-limit", "300", "--rotation", "0", "--shift", "0",
             "--data-dir", str(mnist_root)]
    runs = {}
    for loader in ("tensor", "torchvision"):
        runs[loader] = out = tmp_path / loader
        result = run([sys.executable, "-m", "mnist_dist.train", *flags, "--loader", loader, "--workers", "0",
                      "--report-to", "none", "--output-dir", str(out)], timeout=300)
        assert result.returncode == 0, result.stderr
        assert not (out / "tensorboard").exists()
    tensor, vision = (read_metrics(runs[k])["epochs"][0] for k in ("tensor", "torchvision"))
    assert (vision["train_images"], vision["val_total"]) == (tensor["train_images"], tensor["val_total"]) == (1280, 300)
    assert vision["val_correct"] == tensor["val_correct"]
    assert count_correct(runs["torchvision"] / "model.safetensors", mnist_root, 300) == vision["val_correct"]
    for key in ("train_loss", "val_loss"):
        assert vision[key] == pytest.approx(tensor[key], rel=1e-4), key


def test_compile_trains_and_saves_weights_that_load(tmp_path, mnist_root):
    out = tmp_path / "run"
    result = run([sys.executable, "-m", "mnist_dist.train", "--compile", "--epochs", "1", "--train-limit", "256",
                  "--test-limit", "100", "--data-dir", str(mnist_root), "--output-dir", str(out)], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert count_correct(out / "model.safetensors", mnist_root, 100) == read_metrics(out)["epochs"][0]["val_correct"]
