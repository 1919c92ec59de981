"""Train the seed's CNN on MNIST with Hugging Face Accelerate, stopping at the target accuracy.

    accelerate launch -m mnist_dist.train                    # one process: the CPU or one GPU
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m mnist_dist.train
    accelerate launch --multi_gpu -m mnist_dist.train        # every GPU of this machine

Options: `python -m mnist_dist.train --help`. `train()` tells the story; each stage below is one step of it.
"""
import copy
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from mnist_dist import job
from mnist_dist.errors import RunError
from mnist_dist.settings import Settings, check_precision, parse_args, resolve, trackers

job.watch_launcher()  # before the imports below, which take seconds: no trainer outlives its launcher
# Run as a program, the command line is read now: --help and a bad flag answer at once, not after those imports.
PARSED = parse_args() if __name__ == "__main__" else None

import psutil  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator, PartialState  # noqa: E402
from accelerate.utils import broadcast_object_list, set_seed, tqdm  # noqa: E402

from mnist_dist import checkpoint, rundir  # noqa: E402
from mnist_dist.average import BN_BATCH, BN_IMAGES, Average  # noqa: E402
from mnist_dist.checkpoint import TRAJECTORY, Progress  # noqa: E402
from mnist_dist.data import augmentation, epoch_batches, load_tensors, make_loaders, prepare_mnist, sharding  # noqa: E402
from mnist_dist.distributed import (check_launch, check_launcher, collective_timeout, join_restarted_group,  # noqa: E402
                                    set_threads, sync_batchnorm, together, use_cpu)
from mnist_dist.metrics import (Score, epoch_label, epoch_line, evaluation_points, final_line, met,  # noqa: E402
                                run_metrics, score)
from mnist_dist.model import Net, count_params, summary_table  # noqa: E402
from mnist_dist.poll import DIVERGED, POLL_STEPS, poll, since_row  # noqa: E402
from mnist_dist.plot import final_figures  # noqa: E402
from mnist_dist.schedule import Schedule  # noqa: E402
from mnist_dist.speed import keep_freed_memory, to_channels_last, tune  # noqa: E402
from mnist_dist.tracking import Trackers, inside  # noqa: E402

@dataclass
class Run:
    """What every stage shares: resolved settings, the accelerator, the run folder."""
    s: Settings
    accelerator: Accelerator
    out: Path
    info: dict  # what config.json records
    resume_from: Path | None
    data_root: Path
    t_start: float  # process start: the seconds include imports and set-up
    stop: job.StopSignals
    trackers: Trackers
    seconds_before: float = 0.0  # a resumed run's wall seconds in its earlier processes, up to the checkpoint
    t_row: float = 0.0  # when training since the history's last row began (time.perf_counter)
    scored: Score | None = None  # this process's last evaluation

    def spent(self) -> float:
        """Wall seconds of the run so far, over resumes (what a killed process did after its checkpoint is lost)."""
        return self.seconds_before + time.time() - self.t_start


@dataclass
class Parts:
    """What `build` prepares: the model, its optimizer and schedule, and the loaders."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Schedule
    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader
    test: torch.utils.data.DataLoader | None  # with --val-split only
    summary: str  # torchsummary's layer table
    average: Average | None  # with --ema: what evaluation scores and the run saves


def start_run(s: Settings) -> Run:
    """Process group, accelerator and run folder, with every input checked before anything is written."""
    t_start = psutil.Process().create_time()
    check_launcher()
    stop = job.StopSignals()  # first: a launcher may forward a signal while the job is still starting
    keep_freed_memory()
    threads = set_threads()
    cpu = use_cpu(torch.cuda.is_available())
    # The start's waits (data preparation, compiling) are no sign of a dead process: --timeout applies after epoch 1.
    join_restarted_group(cpu, timedelta(seconds=s.start_timeout))
    state = PartialState(cpu=cpu, timeout=timedelta(seconds=s.start_timeout))
    out = Path(broadcast_object_list([rundir.run_name(s.output_dir, s.resume)])[0])
    check_precision(s.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", ""))
    try:  # step_scheduler_with_optimizer off: the schedule is per step at any world size
        accelerator = Accelerator(
            cpu=cpu, mixed_precision=s.mixed_precision or None, log_with=inside(trackers(s.report_to), out),
            project_dir=out, dataloader_config=sharding(s.seed), step_scheduler_with_optimizer=False)
    except ValueError as err:  # a precision this machine cannot run: fp8 without its libraries, bf16 on an old GPU
        raise RunError(f"Accelerate cannot set up this run: {err}") from None
    check_launch(state, accelerator.mixed_precision)
    s = resolve(s, accelerator.num_processes, accelerator.device.type, accelerator.mixed_precision)
    info = rundir.describe(s, accelerator, out, threads)
    resume_from = checkpoint.resume_point(s.resume, out, {k: info[k] for k in TRAJECTORY})
    data_root = together(prepare_mnist, s.data_dir)  # safe on shared storage: a file lock, atomic renames
    together(rundir.claim, out, info, not (s.resume or job.restarted()), main_only=True)
    return Run(s, accelerator, out, info, resume_from, data_root, t_start, stop, Trackers(accelerator, out))


def build(run: Run) -> Parts:
    """Data, model, optimizer and schedule, prepared by Accelerate."""
    s, accelerator = run.s, run.accelerator
    set_seed(s.seed)  # the same initial weights on every rank
    train_loader, val_loader, test_loader, bn_images = make_loaders(s, run.data_root, accelerator.device,
                                                                    BN_IMAGES, BN_BATCH)
    model = Net(s.dropout)
    table = summary_table(model)
    accelerator.print(table)
    plain = to_channels_last(copy.deepcopy(model)) if s.channels_last else copy.deepcopy(model)
    if s.sync_bn and accelerator.num_processes > 1:
        model = sync_batchnorm(model, accelerator.device)
    model = tune(model, s, accelerator.device, accelerator.mixed_precision)
    # fused: one kernel for all 16 parameter tensors; with 9,720 parameters Adam's cost is per-op overhead.
    optimizer = torch.optim.Adam(model.parameters(), lr=s.lr, fused=True)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    test_loader = test_loader and accelerator.prepare(test_loader)
    # The average is a network of its own, prepared for evaluation (mixed precision, no DDP): Accelerate then
    # saves and restores it with the trained one in every checkpoint (model_1.safetensors).
    average = None
    if s.ema:
        average = Average(model, accelerator.prepare_model(plain, evaluation_mode=True), s.ema, bn_images)
    steps = len(train_loader)
    # The cycle spans --schedule-epochs, or all of a shorter run; a resumed run keeps its own.
    scheduler = accelerator.prepare(Schedule(optimizer, s.lr, steps * min(s.schedule_epochs, s.epochs), steps, s.tail_lr))
    set_seed(s.seed, device_specific=True)  # distinct dropout masks and augmentation per rank
    return Parts(model, optimizer, scheduler, train_loader, val_loader, test_loader, table, average)


def resume_or_start(run: Run, parts: Parts) -> Progress:
    """The loop's progress: fresh, or restored with everything else from a checkpoint."""
    progress = Progress(trajectory={k: run.info[k] for k in TRAJECTORY})
    run.accelerator.register_for_checkpointing(progress)
    if run.resume_from:
        together(checkpoint.load, run.accelerator, run.resume_from)
        run.seconds_before = progress.seconds
        run.accelerator.print(f"resumed from {run.resume_from} after epoch {progress.epoch}"
                              + (f", step {progress.batches_done}" if progress.batches_done else ""))
        if progress.batches_done and progress.epoch >= run.s.epochs and not finished(run, parts, progress):
            raise RunError(f"'{run.resume_from}' was saved {progress.batches_done} steps into epoch "
                           f"{progress.epoch + 1}, past --epochs {run.s.epochs}: the run would end on part-trained "
                           f"weights. Resume it with --epochs {progress.epoch + 1} or more.")
    run.trackers.start(run.info, parts.summary, progress.step(len(parts.train)))
    return progress


def train_epoch(run: Run, parts: Parts, progress: Progress) -> list[float] | None:
    """One epoch (or its rest, after a mid-epoch resume) with its evaluations within (--eval-every). Returns the
    training sums since the history's last row (since_row), or None where one of those evaluations met the target."""
    acc, steps, done = run.accelerator, len(parts.train), progress.batches_done
    parts.model.train()
    parts.train.set_epoch(progress.epoch + 1)
    batches = epoch_batches(acc, parts.train, done, augmentation(run.s))
    within = evaluation_points(steps, run.s.eval_every)
    # Sums kept on the device, so that no step waits for it; `new_tensor(1)` would copy from the host.
    local = torch.zeros(3, device=acc.device)  # this rank's loss x images, correct, images since the last row
    window = torch.zeros(5, device=acc.device)  # since the last poll: loss sum, bad losses, steps; poll's 2 flags
    one = torch.ones((), device=acc.device)
    # One bar per machine (its first process), and only on a terminal: a log file would fill with redraws.
    bar = tqdm(batches, desc=f"epoch {progress.epoch + 1}", initial=done, total=steps, leave=False,
               disable=not sys.stderr.isatty(), unit="batch")
    t0 = time.perf_counter()
    for x, y in bar:
        logits = parts.model(x)
        loss = F.cross_entropy(logits, y)
        parts.optimizer.zero_grad(set_to_none=True)
        acc.backward(loss)
        parts.optimizer.step()
        parts.scheduler.step()
        done += 1
        if parts.average:
            parts.average.update(progress.epoch * steps + done)
        loss = loss.detach()
        local += torch.stack([loss * len(y), (logits.argmax(1) == y).sum(), one * len(y)])
        window[:3] += torch.stack([loss, ~(loss < DIVERGED), one])  # the flag is also set by nan
        # Before the poll: a checkpoint that a signal makes at this step then holds this point's row.
        if done in within and evaluate_within(run, parts, progress, local, done, within[done]):
            bar.close()
            return None
        if done % POLL_STEPS == 0 or done == steps:
            poll(run, progress, window, local, done, steps, parts.optimizer.param_groups[0]["lr"])
            if not bar.disable:  # a host wait for the bar's numbers, only where someone watches
                loss_sum, hits, seen = local.tolist()
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{100 * hits / seen:.2f}%",
                                img_s=f"{seen * acc.num_processes / (time.perf_counter() - t0):,.0f}")
    return since_row(acc, local, progress)


def evaluate_within(run: Run, parts: Parts, progress: Progress, local: torch.Tensor, done: int, part: float) -> bool:
    """An evaluation `done` steps into the epoch (--eval-every): a row of the history; True where the run stops
    here on the target, with a checkpoint of this point. Every rank must call it; every rank answers alike."""
    sums, progress.carried, progress.batches_done = since_row(run.accelerator, local, progress), [0.0] * 3, done
    local.zero_()
    # The evaluation's loader draws its seed from the stream that augmentation and dropout draw from; put back,
    # the stream, and so the trajectory, stay those of a run that evaluates at epoch ends only.
    with torch.random.fork_rng(devices=[]):
        record(run, parts, progress, sums, epoch_label(progress.epoch, part))
    parts.model.train()  # scored itself with --ema 0
    if finished(run, parts, progress):
        checkpoint.save(run.accelerator, run.out, progress, run.s.keep_checkpoints)
        run.accelerator.set_trigger()
    return run.accelerator.check_trigger()  # a sum over ranks: every rank leaves at the same point


def evaluated(run: Run, parts: Parts) -> torch.nn.Module:
    """What evaluation scores, the stop looks at and the run saves: the average of the weights (--ema), or the
    trained network. Every rank must call it. Either way every rank scores what rank 0 saves: DDP broadcasts rank
    0's BatchNorm statistics before each forward pass (broadcast_buffers), and the average broadcasts its own."""
    return parts.average.ready(run.accelerator) if parts.average else parts.model


def finished(run: Run, parts: Parts, progress: Progress) -> bool:
    """Whether the history's last row met the target, with no step taken since."""
    return met(progress.history, progress.step(len(parts.train)), len(parts.train), run.s.target_acc)


def record(run: Run, parts: Parts, progress: Progress, sums: list[float], epoch: int | float) -> None:
    """Score what the run evaluates, and record it at this point of `epoch`: a row of the history, the trackers,
    the log line. Every rank must call it."""
    acc = run.accelerator
    train_seconds = time.perf_counter() - run.t_row
    val = score(evaluated(run, parts), parts.val, acc)
    loss_sum, hits, seen = sums
    row = {"epoch": epoch, "step": progress.step(len(parts.train)), "train_loss": loss_sum / seen,
           "train_acc": 100 * hits / seen, "val_loss": val.loss, "val_acc": 100 * val.correct / val.total,
           "seconds": time.perf_counter() - run.t_row, "train_seconds": train_seconds, "train_images": int(seen),
           "val_correct": val.correct, "val_total": val.total, "elapsed": run.spent()}
    progress.history.append(row)
    progress.seconds = row["elapsed"]
    run.trackers.log_epoch(row, parts.optimizer.param_groups[0]["lr"], row["step"])
    acc.print(epoch_line(row, run.s.epochs))
    run.t_row, run.scored = time.perf_counter(), val


def end_epoch(run: Run, parts: Parts, progress: Progress, sums: list[float]) -> None:
    """Evaluate and record the epoch's end, and save a checkpoint."""
    progress.batches_done = len(parts.train)  # the row's step: the epoch's last
    record(run, parts, progress, sums, epoch_label(progress.epoch, 1))
    progress.epoch, progress.batches_done, progress.carried = progress.epoch + 1, 0, [0.0, 0.0, 0.0]
    checkpoint.save(run.accelerator, run.out, progress, run.s.keep_checkpoints)


def finish(run: Run, parts: Parts, progress: Progress) -> dict:
    """The final metrics; the main process writes the run's files and the trackers' report."""
    s, acc = run.s, run.accelerator
    tested = parts.test is not None  # the test set scored once more only if the loop has not just done it
    net = evaluated(run, parts)
    final = score(net, parts.test if tested else parts.val, acc) if tested or not run.scored else run.scored
    metrics = run_metrics(s, progress.history, count_params(parts.model), acc.num_processes, acc.mixed_precision,
                          len(parts.average.images.dataset) if parts.average else 0, final if tested else None)
    try:
        # The plain Net's parameter names, also under --compile, so evaluate/predict load them.
        weights = acc.unwrap_model(net, keep_torch_compile=False).state_dict()
        together(rundir.write_results, run.out, weights, metrics, main_only=True)
        pictures = lambda: final_figures(load_tensors(run.data_root, False, s.test_limit)[0], final)  # noqa: E731
        together(run.trackers.report, run.info, metrics, pictures, progress.step(len(parts.train)), main_only=True)
    except RunError as err:
        raise RunError(f"{err}. The checkpoint '{checkpoint.newest(run.out)}' is complete: once there is room, "
                       "the same command with --resume writes the run's files.") from None
    acc.end_training()
    acc.print(final_line(metrics, run.out))
    return metrics


def train(s: Settings) -> dict:
    """Train until validation accuracy reaches `s.target_acc` or `s.epochs` run out; return the metrics."""
    run = start_run(s)
    parts = build(run)
    progress = resume_or_start(run, parts)
    run.accelerator.print(rundir.banner(run.info, count_params(parts.model), len(parts.train)))
    job.training.set()  # a launcher that dies from now on gets a checkpoint
    while progress.epoch < run.s.epochs and not finished(run, parts, progress):
        run.t_row = time.perf_counter()
        sums = train_epoch(run, parts, progress)
        if sums is None:  # an evaluation within the epoch met the target
            break
        end_epoch(run, parts, progress, sums)
        collective_timeout(run.s.timeout)  # the start is over: from now on a wait this long means a lost process
        if finished(run, parts, progress):
            run.accelerator.set_trigger()
        if run.accelerator.check_trigger():  # a sum over ranks: every rank leaves on the same epoch
            break
    return finish(run, parts, progress)


def main(argv: list[str] | None = None, settings: Settings | None = None) -> int:
    """Train; the exit status (job.ending says which)."""
    settings = settings or parse_args(argv)
    return job.ending(lambda: train(settings), settings.resume)


if __name__ == "__main__":
    job.leave(main(settings=PARSED))
