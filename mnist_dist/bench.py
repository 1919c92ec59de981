"""Time-to-accuracy benchmark: the seed-style recipe against the package's own command, side by side.

    python -m mnist_dist.bench                # 10 seeds of the package, 3 of the baseline
    python -m mnist_dist.bench --seeds 3 --baseline-runs 1 --markdown /tmp/b.md
    python -m mnist_dist.bench --baseline-ref 897ed7b --baseline-runs 10 --markdown /tmp/b.md  # an older version
    python -m mnist_dist.bench --slurm --sbatch-args="--partition cpu --cpus-per-task 2"  # as one SLURM job array

The package runs as users run it, `accelerate launch -q -m mnist_dist.train` with no accelerate config;
the seed-style baseline as the seed ran it, in a plain `python` process. Runs alternate (baseline seed 1,
package seed 1, baseline seed 2, ...) so that a noisy machine slows both alike. Writes medians over runs
as a markdown table, every run, and a plot of test accuracy against wall-clock seconds.

With `--baseline-ref REF` the baseline is instead the package's own command at git commit REF, run from an
export of that commit: a change's effect on speed and stop epochs, measured side by side.

With `--slurm` the same runs are one SLURM job array instead (launch/bench_array.sbatch, one task per run, in the
same order), under a work folder the nodes share (`--workdir`, default runs/bench-<time>); the bench waits for
the array (`squeue`), then reads each run's files into the same report. A run that did not finish fails the
bench, named with its task's log.
`--train-args="--epochs 2 ..."` gives both paths more training flags (after `=`: the value starts with `-`).
"""
import argparse
import json
import math
import platform
import re
import shlex
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


def plan(seeds: int, baseline_runs: int) -> list[tuple[str, int]]:
    """Every run as (path, seed), the paths alternating seed by seed (baseline 1, package 1, baseline 2, ...)
    so that a noisy machine slows both alike. Run i is array task i of the SLURM mode."""
    return [(name, seed) for seed in range(1, max(seeds, baseline_runs) + 1)
            for name, runs in (("baseline", baseline_runs), ("fast", seeds)) if seed <= runs]


def run_dir(root: Path, name: str, seed: int) -> Path:
    """The run folder of (path, seed) under `root`: fixed, so that an array task and the gatherer agree on it."""
    return root / f"{name}-seed{seed}"


def launch_record(out: Path) -> Path:
    """Beside run folder `out`: what its array task records once the command has ended (seconds, machine)."""
    return out.with_name(f"{out.name}.launch.json")


def commands(args, source: Path | None) -> dict[str, tuple[list[str], Path | None]]:
    """Each path's command and the folder it starts in: the baseline from the export `source` of --baseline-ref
    if given, else the seed-style recipe; both with the user's --train-args last."""
    extra = shlex.split(args.train_args)
    fast = [*LAUNCH["fast"], *FAST, *extra]
    baseline = (fast, source) if source else ([*LAUNCH["baseline"], *BASELINE, *extra], None)
    return {"baseline": baseline, "fast": (fast, None)}


def run_once(cmd: list[str], seed: int, data_dir: str, out: Path, cwd: Path | None = None,
             stdout=subprocess.DEVNULL) -> float:
    """Run `cmd` with `seed` into run folder `out`, from `cwd` if given; the wall time of the whole command, s."""
    full = [*cmd, "--seed", str(seed), "--data-dir", str(Path(data_dir).resolve()), "--output-dir", str(out)]
    t0 = time.perf_counter()
    subprocess.run(full, check=True, stdout=stdout, cwd=cwd)
    return time.perf_counter() - t0


def collect(out: Path, seed: int, launch_seconds: float) -> dict:
    """A run's result: its metrics plus `launch_seconds`, the wall time of the whole command, `threads`, per
    process (config.json's: another count sums floats in another order, and may stop elsewhere), and `seed`."""
    threads = json.loads((out / "config.json").read_text())["threads"]
    return {**json.loads((out / "metrics.json").read_text()), "launch_seconds": launch_seconds, "threads": threads,
            "seed": seed}


def run_local(args) -> dict[str, list[dict]]:
    """The runs one after another on this machine, in a temporary folder."""
    results: dict[str, list[dict]] = {"baseline": [], "fast": []}
    with tempfile.TemporaryDirectory() as tmp:
        source = export(args.baseline_ref, Path(tmp)) if args.baseline_ref else None
        paths = commands(args, source)
        for name, seed in plan(args.seeds, args.baseline_runs):
            cmd, cwd = paths[name]
            out = run_dir(Path(tmp), name, seed)
            m = collect(out, seed, run_once(cmd, seed, args.data_dir, out, cwd))
            results[name].append(m)
            print(f"{name:8s} seed {seed:2d}: stop epoch {m['stop_epoch']:>4}, {m['final_val_acc']:.2f}%, "
                  f"{m['wall_seconds']:.1f} s", flush=True)
    return results


def epoch_seconds(m: dict) -> list[float]:
    """Seconds of each whole epoch of a run, its evaluations included: the sum of its rows (two with --eval-every
    0.5); an epoch the run stopped within is not whole."""
    return [sum(e["seconds"] for e in m["epochs"] if math.ceil(e["epoch"]) == k)
            for k in (e["epoch"] for e in m["epochs"]) if k == int(k)]


def final_test_acc(m: dict) -> float:
    """A run's final test accuracy: scored once at the end with --val-split, else its last validation."""
    return m.get("test_acc", m["final_val_acc"])


def summarize(runs: list[dict]) -> dict:
    """Medians over runs; stop epochs and times over the runs that reached the target (nan where there are none:
    no run reached, or the path did not run, --baseline-runs 0)."""
    hits = [m for m in runs if m["reached_target"]]

    def median(values) -> float:
        values = list(values)
        return statistics.median(values) if values else float("nan")
    return {"runs": len(runs), "reached": len(hits),
            "images_per_s": median(e["train_images"] / e["train_seconds"] for m in runs for e in m["epochs"]),
            "s_per_epoch": median(s for m in runs for s in epoch_seconds(m)),
            "stop_epoch": median(m["stop_epoch"] for m in hits),
            "max_stop_epoch": max((m["stop_epoch"] for m in hits), default=float("nan")),
            "time_to_target": median(m["wall_seconds"] for m in hits),
            "launch_to_exit": median(m["launch_seconds"] for m in hits),
            "final_acc": median(final_test_acc(m) for m in runs)}


def machine() -> str:
    """The CPU model, whether it has AMX (which makes bf16 pay on the CPU), the cores and torch."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    cpu = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    return (f"{cpu[1] if cpu else platform.machine()} ({'with' if 'amx_bf16' in info else 'no'} AMX), "
            f"{cores()} cores, torch {torch.__version__}")


def invocation(args) -> str:
    """The bench command behind a report, with every flag that changes what it measures or where it ran."""
    return (f"python -m mnist_dist.bench --seeds {args.seeds} --baseline-runs {args.baseline_runs}"
            + (f" --baseline-ref {args.baseline_ref}" if args.baseline_ref else "")
            + (f" --train-args={shlex.quote(args.train_args)}" if args.train_args else "")
            + (" --slurm" if args.slurm else ""))


def report(results: dict[str, list[dict]], args, machines: str) -> str:
    """The markdown report: medians side by side, then every run; `machines` says where they ran."""
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
                           f"| {final_test_acc(m):.2f} | {m['wall_seconds']:.1f} | {m['launch_seconds']:.1f} |")
    return "\n".join([
        "# Benchmarks", "",
        f"Machine: {machines}. One process, {threads} thread(s). Command: `{invocation(args)}`.",
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
    target = next(m for runs in results.values() for m in runs)["target_acc"]
    ax.axhline(target, color="gray", lw=1, label=f"target {target}%")
    ax.set(xlabel="seconds since process start", ylabel="test accuracy (%)", ylim=(98.0, 99.7),
           title="Test accuracy against wall-clock time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# SLURM: the same runs as one job array, each task in the fixed run folder of its (path, seed). The script is the
# repository's, beside the package (installed with pip install -e); sbatch copies it at submission.
ARRAY = Path(__file__).resolve().parents[1] / "launch" / "bench_array.sbatch"
POLL_SECONDS = 2  # between two squeue calls while the array runs: one cheap query of slurmctld each


def run_task(args) -> None:
    """Array task `args.task` (launch/bench_array.sbatch): run that run of the plan with --resume auto, so that a
    requeued task continues its run in its folder instead of starting a second one, then record beside the folder
    the command's wall time and this node; the gatherer counts a run only with both."""
    name, seed = plan(args.seeds, args.baseline_runs)[args.task]
    source = args.workdir / f"source-{args.baseline_ref}" if args.baseline_ref else None  # as export() named it
    cmd, cwd = commands(args, source)[name]
    out = run_dir(args.workdir, name, seed)
    print(f"mnist_dist.bench: task {args.task}: {name} seed {seed} into {out}", flush=True)
    seconds = run_once([*cmd, "--resume", "auto"], seed, args.data_dir, out, cwd, stdout=None)  # None: to the log
    launch_record(out).write_text(json.dumps({"launch_seconds": seconds, "machine": machine()}))


def submit(args, workdir: Path, tasks: int) -> str:
    """Submit tasks 0..tasks-1 as one array, each with this bench's flags (absolute paths: a task may start
    elsewhere); its job id. Logs go to workdir/logs/JOBID_TASK.log, appended to by a requeued task."""
    flags = ["--workdir", str(workdir), "--seeds", str(args.seeds), "--baseline-runs", str(args.baseline_runs),
             "--data-dir", str(Path(args.data_dir).resolve()), f"--train-args={args.train_args}",
             *(["--baseline-ref", args.baseline_ref] if args.baseline_ref else [])]
    cmd = ["sbatch", "--parsable", f"--array=0-{tasks - 1}", "--output", str(workdir / "logs" / "%A_%a.log"),
           *shlex.split(args.sbatch_args), str(ARRAY), *flags]
    submitted = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if submitted.returncode:
        raise SystemExit(f"mnist_dist.bench: sbatch failed: {submitted.stderr.strip()}")
    return submitted.stdout.strip().split(";")[0]  # "JOBID" or "JOBID;CLUSTER"


def wait(job: str, timeout: float) -> None:
    """Return once squeue lists no task of array `job` (pending, running, requeued); past `timeout` s, cancel the
    array and exit non-zero. squeue, not sacct: a cluster without an accounting database has no sacct."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        listed = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, timeout=60)
        # "Invalid job id": slurmctld has already forgotten the ended job (MinJobAge). Any other failure is
        # polled again: slurmctld may be busy for a moment.
        if (listed.returncode == 0 and not listed.stdout.strip()) or "Invalid job id" in listed.stderr:
            return
        time.sleep(POLL_SECONDS)
    subprocess.run(["scancel", job], timeout=60)
    raise SystemExit(f"mnist_dist.bench: job array {job} did not end within --slurm-timeout {timeout:g} s; "
                     "cancelled it")


def gather(workdir: Path, todo: list[tuple[str, int]], job: str) -> tuple[dict[str, list[dict]], str]:
    """Each run's result from its fixed folder, in plan order, so exactly one per (path, seed); and the nodes'
    machines. A run with no metrics.json or no record of its end (its task failed) exits non-zero, named with
    its task and log: the report must not silently hold fewer seeds."""
    results: dict[str, list[dict]] = {"baseline": [], "fast": []}
    machines, missing = set(), []
    for task, (name, seed) in enumerate(todo):
        out = run_dir(workdir, name, seed)
        record = launch_record(out)
        if not (out / "metrics.json").is_file() or not record.is_file():
            missing.append(f"{name} seed {seed} (task {job}_{task}, log {workdir / 'logs' / f'{job}_{task}.log'})")
            continue
        ended = json.loads(record.read_text())
        results[name].append(collect(out, seed, ended["launch_seconds"]))
        machines.add(ended["machine"])
    if missing:
        raise SystemExit(f"mnist_dist.bench: {len(missing)} of {len(todo)} runs did not finish: {'; '.join(missing)}")
    return results, "; ".join(sorted(machines))


def run_slurm(args) -> tuple[dict[str, list[dict]], str]:
    """The runs as one job array in a new work folder; their results and the nodes' machines."""
    workdir = (args.workdir or Path(f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}")).resolve()
    if workdir.exists() and any(workdir.iterdir()):  # an earlier bench's metrics.json must not count as this one's
        raise SystemExit(f"mnist_dist.bench: --workdir {workdir} is not empty; name a new folder")
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    if args.baseline_ref:
        export(args.baseline_ref, workdir)  # there, not in a temporary folder: the tasks run from it
    todo = plan(args.seeds, args.baseline_runs)
    job = submit(args, workdir, len(todo))
    print(f"mnist_dist.bench: {len(todo)} runs submitted as job array {job}; logs in {workdir / 'logs'}", flush=True)
    wait(job, args.slurm_timeout)
    results, machines = gather(workdir, todo, job)
    return results, f"{machines} (the nodes of job array {job})"


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="mnist_dist.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10, help="fast-path runs, seeds 1..N")
    parser.add_argument("--baseline-runs", type=int, default=3, help="baseline runs, seeds 1..N (each is minutes)")
    parser.add_argument("--baseline-ref", help="a git commit: the baseline is the package's defaults at it")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--markdown", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--train-args", default="", help="more flags for every run of both paths, one string: "
                                                         "--train-args='--epochs 2 --train-limit 2000'")
    slurm = parser.add_argument_group("SLURM")
    slurm.add_argument("--slurm", action="store_true", help="submit the runs as one SLURM job array and wait for it")
    slurm.add_argument("--workdir", type=Path, help="a new folder that every node reads and writes: run folders, "
                                                     "logs, the export of --baseline-ref (default runs/bench-<time>)")
    slurm.add_argument("--sbatch-args", default="", help="flags for sbatch, one string: "
                                                         "--sbatch-args='--partition cpu --time 30'")
    slurm.add_argument("--slurm-timeout", type=float, default=86400,
                       help="seconds to wait for the array; past them it is cancelled and the bench fails")
    slurm.add_argument("--task", type=int, help=argparse.SUPPRESS)  # an array task's own call (bench_array.sbatch)
    args = parser.parse_args(argv)
    if min(args.seeds, args.baseline_runs) < 0 or args.seeds + args.baseline_runs == 0:
        parser.error("--seeds and --baseline-runs count runs: 0 or more each, and at least one run in all")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.task is not None:
        return run_task(args)
    results, machines = run_slurm(args) if args.slurm else (run_local(args), machine())
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    # The runs first: they took the time; the report and the plot can be made again from them.
    (args.markdown.parent / "bench_runs.json").write_text(json.dumps(results, indent=1))
    text = report(results, args, machines)
    plot(results, args.markdown.parent / "bench_accuracy_vs_time.png")
    write_report(args.markdown, text)
    print(text)


if __name__ == "__main__":
    main()
