"""The benchmark's pieces: medians over runs, the report file it rewrites, and the export of an older commit."""
import math
import subprocess
import sys
from types import SimpleNamespace

from mnist_dist.bench import ELSEWHERE, export, report, summarize, write_report

from conftest import REPO, run as run_command


def run(stop_epoch: int, reached: bool, wall: float, images_per_s: float) -> dict:
    epochs = [{"train_images": 60000, "train_seconds": 60000 / images_per_s, "seconds": 10.0}] * stop_epoch
    return {"stop_epoch": stop_epoch, "reached_target": reached, "wall_seconds": wall, "final_val_acc": 99.4,
            "launch_seconds": wall + 5, "epochs": epochs}


def test_summarize_takes_medians_and_counts_only_runs_that_reached():
    s = summarize([run(5, True, 60.0, 5000), run(6, True, 70.0, 6000), run(19, False, 300.0, 7000)])
    assert (s["runs"], s["reached"]) == (3, 2)
    assert (s["stop_epoch"], s["max_stop_epoch"], s["time_to_target"], s["launch_to_exit"]) == (5.5, 6, 65.0, 70.0)
    assert s["images_per_s"] == 7000  # median over all 30 epochs: 5 at 5,000, 6 at 6,000, 19 at 7,000


def test_summarize_without_a_run_that_reached_gives_nan():
    s = summarize([run(19, False, 300.0, 5000)])
    assert s["reached"] == 0 and math.isnan(s["stop_epoch"]) and math.isnan(s["time_to_target"])


def test_the_report_names_the_thread_count_its_runs_had():
    runs = [{**run(5, True, 60.0, 5000), "seed": 1, "threads": 1}]
    text = report({"baseline": runs, "fast": runs}, SimpleNamespace(seeds=1, baseline_runs=1, baseline_ref="abc"))
    assert "One process, 1 thread(s)." in text


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
