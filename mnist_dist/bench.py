"""Time-to-accuracy benchmark: the seed-style recipe against the package's own command, side by side.

    python -m mnist_dist.bench                # 10 seeds of the package, 3 of the baseline
    python -m mnist_dist.bench --seeds 3 --baseline-runs 1 --markdown /tmp/b.md
    python -m mnist_dist.bench --baseline-ref 897ed7b --baseline-runs 10 --markdown /tmp/b.md  # an older version

The package runs as users run it, `accelerate launch -q -m mnist_dist.train` with no accelerate config;
the seed-style baseline as the seed ran it, in a plain `python` process. Runs alternate (baseline seed 1,
package seed 1, baseline seed 2, ...) so that a noisy machine slows both alike. Writes medians over runs
as a markdown table, every run, and a plot of test accuracy against wall-clock seconds.

With `--baseline-ref REF` the baseline is instead the package's own command at git commit REF, run from an
export of that commit: a change's effect on speed and stop epochs, measured side by side.
"""
import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mnist_dist.distributed import cores  # noqa: E402

# The seed-style recipe: torchvision DataLoader with per-image PIL rotation,
# batch 128, fp32 NCHW, Adam with a one-cycle schedule to 0.01, dropout 0.05.
BASELINE = ["--loader", "torchvision", "--batch-size", "128", "--lr", "0.01", "--schedule-epochs", "15",
            "--tail-lr", "0", "--dropout", "0.05", "--shift", "0", "--no-channels-last"]
FAST: list[str] = []  # the package defaults
LAUNCH = {"baseline": [sys.executable, "-m", "mnist_dist.train"],
          "fast": [str(Path(sys.executable).with_name("accelerate")), "launch", "-q", "-m", "mnist_dist.train"]}
# Figures from other machines (a GPU), added to the markdown by hand under this heading, are kept.
ELSEWHERE = "## Measured elsewhere"


def export(ref: str, workdir: Path) -> Path:
    """The package's source at git commit `ref`, in a folder of `workdir`: a trainer started there with
    `-m` imports it, not the installed package (the current folder comes first on `sys.path`)."""
    folder = workdir / f"source-{ref}"
    folder.mkdir()
    tar = subprocess.run(["git", "archive", "--format=tar", ref, "mnist_dist"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=tar, check=True)
    return folder


def run_once(launch: list[str], args: list[str], seed: int, data_dir: str, workdir: Path, name: str,
             cwd: Path | None = None) -> dict:
    """One run, from `cwd` if given; its metrics plus `launch_seconds`, the wall time of the whole command, and
    `threads`, per process (config.json's): another count sums floats in another order, and may stop elsewhere."""
    out = workdir / f"{name}-seed{seed}"
    cmd = [*launch, *args, "--seed", str(seed), "--data-dir", str(Path(data_dir).resolve()),
           "--output-dir", str(out)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=cwd)
    seconds = time.perf_counter() - t0
    threads = json.loads((out / "config.json").read_text())["threads"]
    return {**json.loads((out / "metrics.json").read_text()), "launch_seconds": seconds, "threads": threads}


def summarize(runs: list[dict]) -> dict:
    """Medians over runs; stop epochs and times over the runs that reached the target (nan if none did)."""
    epochs = [e for m in runs for e in m["epochs"]]
    hits = [m for m in runs if m["reached_target"]]

    def median(key: str, over: list[dict] = hits) -> float:
        return statistics.median(m[key] for m in over) if over else float("nan")
    return {"runs": len(runs), "reached": len(hits),
            "images_per_s": statistics.median(e["train_images"] / e["train_seconds"] for e in epochs),
            "s_per_epoch": median("seconds", epochs), "stop_epoch": median("stop_epoch"),
            "max_stop_epoch": max((m["stop_epoch"] for m in hits), default=float("nan")),
            "time_to_target": median("wall_seconds"), "launch_to_exit": median("launch_seconds"),
            "final_acc": median("final_val_acc", runs)}


def machine() -> str:
    """The CPU model, whether it has AMX (which makes bf16 pay on the CPU), the cores and torch."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    cpu = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    return (f"{cpu[1] if cpu else platform.machine()} ({'with' if 'amx_bf16' in info else 'no'} AMX), "
            f"{cores()} cores, torch {torch.__version__}")


def report(results: dict[str, list[dict]], args) -> str:
    s = {name: summarize(runs) for name, runs in results.items()}
    b, f = s["baseline"], s["fast"]
    rows = [  # label, format, key of the ratio
        ("runs that reached the target", lambda x: f"{x['reached']}/{x['runs']}", None),
        ("train images/s (median over epochs)", lambda x: f"{x['images_per_s']:,.0f}", "images_per_s"),
        ("seconds per epoch, with evaluation", lambda x: f"{x['s_per_epoch']:.1f}", "s_per_epoch"),
        ("stop epoch (median / latest)", lambda x: f"{x['stop_epoch']:g} / {x['max_stop_epoch']:g}", "stop_epoch"),
        ("seconds from process start to the stop decision", lambda x: f"{x['time_to_target']:.1f}", "time_to_target"),
        ("seconds from launch to exit", lambda x: f"{x['launch_to_exit']:.1f}", "launch_to_exit"),
        ("final test accuracy (median, %)", lambda x: f"{x['final_acc']:.2f}", None),
    ]
    threads = ", ".join(sorted({str(m.get("threads", "?")) for runs in results.values() for m in runs}))
    base = f"package at {args.baseline_ref}" if args.baseline_ref else "baseline (seed-style, `python`)"
    lines = [f"| measure | {base} | package (`accelerate launch`, no config) | package / baseline |",
             "| --- | ---: | ---: | ---: |"]
    for label, fmt, key in rows:
        ratio = f"{f[key] / b[key]:.2f}x" if key and b[key] == b[key] and f[key] == f[key] else ""  # x == x: not nan
        lines.append(f"| {label} | {fmt(b)} | {fmt(f)} | {ratio} |")
    per_run = ["| path | seed | stop epoch | reached | test acc (%) | seconds to stop | launch to exit |",
               "| --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for name, runs in results.items():
        for m in runs:
            per_run.append(f"| {name} | {m['seed']} | {m['stop_epoch']} | {'yes' if m['reached_target'] else 'no'} "
                           f"| {m['final_val_acc']:.2f} | {m['wall_seconds']:.1f} | {m['launch_seconds']:.1f} |")
    return "\n".join([
        "# Benchmarks", "",
        f"Machine: {machine()}. One process, {threads} thread(s). Command: `python -m mnist_dist.bench --seeds {args.seeds} "
        f"--baseline-runs {args.baseline_runs}{f' --baseline-ref {args.baseline_ref}' if args.baseline_ref else ''}`.",
        "",
        (f"Baseline: the same command at commit {args.baseline_ref}." if args.baseline_ref else
         f"Baseline: `python -m mnist_dist.train {' '.join(BASELINE)}`.") + " Package: `accelerate launch -q -m "
        f"mnist_dist.train {' '.join(FAST)}` (the defaults, no accelerate config).",
        "Runs alternate between the two paths; figures are medians.", "",
        *lines, "", "![accuracy against wall-clock seconds](bench_accuracy_vs_time.png)", "",
        "## Every run", "", *per_run, "",
    ])


def write_report(path: Path, text: str) -> None:
    """Write the markdown report, keeping the hand-written section under ELSEWHERE of the file it replaces."""
    previous = path.read_text() if path.is_file() else ""
    kept = previous[previous.index(ELSEWHERE):] if ELSEWHERE in previous else ""
    path.write_text(text + ("\n" + kept if kept else ""))


def plot(results: dict[str, list[dict]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    for color, (name, runs) in zip(("C1", "C0"), results.items()):
        for i, m in enumerate(runs):
            ax.plot([e["elapsed"] for e in m["epochs"]], [e["val_acc"] for e in m["epochs"]], "-o", ms=2.5,
                    color=color, alpha=0.6, label=name if i == 0 else None)
    target = next(iter(results.values()))[0]["target_acc"]
    ax.axhline(target, color="gray", lw=1, label=f"target {target}%")
    ax.set(xlabel="seconds since process start", ylabel="test accuracy (%)", ylim=(98.0, 99.7),
           title="Test accuracy against wall-clock time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mnist_dist.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10, help="fast-path runs, seeds 1..N")
    parser.add_argument("--baseline-runs", type=int, default=3, help="baseline runs, seeds 1..N (each is minutes)")
    parser.add_argument("--baseline-ref", help="a git commit: the baseline is the package's defaults at it")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--markdown", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args(argv)
    results: dict[str, list[dict]] = {"baseline": [], "fast": []}
    with tempfile.TemporaryDirectory() as tmp:
        source = export(args.baseline_ref, Path(tmp)) if args.baseline_ref else None
        paths = {  # name: command, flags, runs, folder it starts in
            "baseline": (LAUNCH["fast"], FAST, args.baseline_runs, source) if source else
                        (LAUNCH["baseline"], BASELINE, args.baseline_runs, None),
            "fast": (LAUNCH["fast"], FAST, args.seeds, None)}
        for seed in range(1, max(args.seeds, args.baseline_runs) + 1):
            for name, (launch, flags, n, cwd) in paths.items():
                if seed <= n:
                    m = run_once(launch, flags, seed, args.data_dir, Path(tmp), name, cwd)
                    results[name].append({**m, "seed": seed})
                    print(f"{name:8s} seed {seed:2d}: stop epoch {m['stop_epoch']:2d}, {m['final_val_acc']:.2f}%, "
                          f"{m['wall_seconds']:.1f} s", flush=True)
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    text = report(results, args)
    plot(results, args.markdown.parent / "bench_accuracy_vs_time.png")
    write_report(args.markdown, text)
    (args.markdown.parent / "bench_runs.json").write_text(json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
