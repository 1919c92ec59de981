"""The benchmark's pieces: medians over runs, the report file it rewrites, the export of an older commit, and the
SLURM mode's plan of array tasks and its gathering of their runs (tests/test_bench_slurm.py runs it on SLURM)."""
import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest

from mnist_dist.bench import (BASELINE, ELSEWHERE, FAST, LAUNCH, commands, export, gather, parse_args, plan, plot,
                               report, summarize, write_report)

from conftest import REPO, run as run_command


def run(stop_epoch: int, reached: bool, wall: float, images_per_s: float) -> dict:
    epochs = [{"epoch": k, "train_images": 60000, "train_seconds": 60000 / images_per_s, "seconds": 10.0,
               "elapsed": 10.0 * k, "val_acc": 99.0} for k in range(1, stop_epoch + 1)]
    return {"stop_epoch": stop_epoch, "reached_target": reached, "wall_seconds": wall, "final_val_acc": 99.4,
            "launch_seconds": wall + 5, "epochs": epochs}


def test_summarize_takes_medians_and_counts_only_runs_that_reached():
    s = summarize([run(5, True, 60.0, 5000), run(6, True, 70.0, 6000), run(19, False, 300.0, 7000)])
    assert (s["runs"], s["reached"]) == (3, 2)
    assert (s["stop_epoch"], s["max_stop_epoch"], s["time_to_target"], s["launch_to_exit"]) == (5.5, 6, 65.0, 70.0)
    assert s["images_per_s"] == 7000  # median over all 30 epochs: 5 at 5,000, 6 at 6,000, 19 at 7,000


def test_seconds_per_epoch_add_up_the_rows_of_each_whole_epoch():
    halves = [{"epoch": e, "seconds": 5.0, "train_images": 30000, "train_seconds": 4.5} for e in (0.5, 1, 1.5, 2, 2.5)]
    s = summarize([{"stop_epoch": 2.5, "reached_target": True, "wall_seconds": 30.0, "final_val_acc": 99.4,
                    "launch_seconds": 35.0, "epochs": halves}])
    assert s["s_per_epoch"] == 10.0 and s["stop_epoch"] == 2.5  # epochs 1 and 2; the half of epoch 3 is not one


def test_summarize_without_a_run_that_reached_gives_nan():
    s = summarize([run(19, False, 300.0, 5000)])
    assert s["reached"] == 0 and math.isnan(s["stop_epoch"]) and math.isnan(s["time_to_target"])


def test_a_bench_of_one_path_reports_it_and_the_held_out_runs_their_test_accuracy(tmp_path):
    """--baseline-runs 0: the package's runs alone (no ratio); with --val-split a run's test accuracy is test_acc."""
    runs = [{**run(5, True, 60.0, 5000), "seed": 1, "threads": 2, "test_acc": 99.5, "target_acc": 99.41}]
    args = SimpleNamespace(seeds=1, baseline_runs=0, baseline_ref=None, train_args="--val-split 5000", slurm=False)
    text = report({"baseline": [], "fast": runs}, args, "a CPU")
    assert "| runs that reached the target | 0/0 | 1/1 |  |" in text
    assert "| final test accuracy (median, %) | nan | 99.50 |  |" in text and "| fast | 1 | 5 | yes | 99.50 |" in text
    plot({"baseline": [], "fast": runs}, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


@pytest.mark.parametrize("counts", [["--seeds", "0", "--baseline-runs", "0"], ["--seeds", "-1"]])
def test_a_bench_without_a_run_is_refused_before_it_starts(counts):
    with pytest.raises(SystemExit):
        parse_args(counts)


def test_the_report_names_the_thread_count_its_runs_had():
    runs = [{**run(5, True, 60.0, 5000), "seed": 1, "threads": 1}]
    args = SimpleNamespace(seeds=1, baseline_runs=1, baseline_ref="abc", train_args="--epochs 2", slurm=True)
    text = report({"baseline": runs, "fast": runs}, args, "a CPU")
    assert "Machine: a CPU. One process, 1 thread(s)." in text
    assert "`python -m mnist_dist.bench --seeds 1 --baseline-runs 1 --baseline-ref abc --train-args='--epochs 2' " \
           "--slurm`" in text


def test_report_keeps_the_hand_written_section_of_the_file_it_replaces(tmp_path):
    path = tmp_path / "benchmarks.md"
    write_report(path, "# Benchmarks\nold table\n")
    assert path.read_text() == "# Benchmarks\nold table\n"
    path.write_text(path.read_text() + f"\n{ELSEWHERE}\n\nH100 figures\n")
    write_report(path, "# Benchmarks\nnew table\n")
    assert path.read_text() == f"# Benchmarks\nnew table\n\n{ELSEWHERE}\n\nH100 figures\n"


def test_a_baseline_ref_runs_the_source_of_that_commit_not_the_installed_package(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    first = subprocess.run(["git", "rev-list", "--max-parents=0", "HEAD"], capture_output=True, text=True,
                           check=True).stdout.split()[0]
    folder = export(first, tmp_path)
    old = subprocess.run(["git", "show", f"{first}:mnist_dist/train.py"], capture_output=True, text=True).stdout
    assert (folder / "mnist_dist" / "train.py").read_text() == old
    found = run_command([sys.executable, "-c", "import mnist_dist; print(mnist_dist.__file__)"], cwd=folder, timeout=60)
    assert found.stdout.strip() == str(folder / "mnist_dist" / "__init__.py"), found.stderr


def test_array_task_i_is_run_i_of_the_plan_the_paths_alternating_seed_by_seed():
    assert plan(3, 1) == [("baseline", 1), ("fast", 1), ("fast", 2), ("fast", 3)]
    assert plan(1, 2) == [("baseline", 1), ("fast", 1), ("baseline", 2)]
    assert plan(2, 0) == [("fast", 1), ("fast", 2)]


def test_both_paths_get_the_train_args_whole_and_last_and_a_baseline_ref_runs_from_its_export(tmp_path):
    args = SimpleNamespace(train_args="--epochs 2 --config 'my runs/c.json'")
    extra = ["--epochs", "2", "--config", "my runs/c.json"]
    assert commands(args, None) == {"baseline": ([*LAUNCH["baseline"], *BASELINE, *extra], None),
                                    "fast": ([*LAUNCH["fast"], *FAST, *extra], None)}
    assert commands(args, tmp_path)["baseline"] == ([*LAUNCH["fast"], *FAST, *extra], tmp_path)


def finished(workdir, name: str, seed: int, stop_epoch: int) -> None:
    """The files a task leaves when its run ends: metrics.json and config.json, and the task's own record."""
    out = workdir / f"{name}-seed{seed}"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps(run(stop_epoch, True, 60.0, 5000)))
    (out / "config.json").write_text(json.dumps({"threads": 1}))
    (workdir / f"{name}-seed{seed}.launch.json").write_text(json.dumps({"launch_seconds": 70.0, "machine": "cpu"}))


def test_the_gatherer_takes_one_result_per_run_in_plan_order(tmp_path):
    for name, seed, stop in (("fast", 2, 4), ("baseline", 1, 5), ("fast", 1, 3)):
        finished(tmp_path, name, seed, stop)
    results, machines = gather(tmp_path, plan(2, 1), "77")
    assert [(m["seed"], m["stop_epoch"], m["launch_seconds"], m["threads"]) for m in results["fast"]] == \
           [(1, 3, 70.0, 1), (2, 4, 70.0, 1)]
    assert [m["seed"] for m in results["baseline"]] == [1] and machines == "cpu"


def test_the_gatherer_names_every_run_a_failed_task_left_unfinished_with_its_log(tmp_path):
    finished(tmp_path, "fast", 1, 3)
    (tmp_path / "fast-seed2").mkdir()  # started, killed before its metrics.json
    finished(tmp_path, "fast", 3, 3)
    (tmp_path / "fast-seed3.launch.json").unlink()  # its metrics.json, but its task ended before recording it
    with pytest.raises(SystemExit) as failed:
        gather(tmp_path, plan(3, 1), "77")
    logs = tmp_path / "logs"
    assert str(failed.value) == (
        f"mnist_dist.bench: 3 of 4 runs did not finish: baseline seed 1 (task 77_0, log {logs}/77_0.log); "
        f"fast seed 2 (task 77_2, log {logs}/77_2.log); fast seed 3 (task 77_3, log {logs}/77_3.log)")
