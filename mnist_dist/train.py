"""Train the seed's CNN on MNIST with Hugging Face Accelerate, stopping at the target accuracy.

    accelerate launch -m mnist_dist.train                    # one process: the CPU or one GPU
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m mnist_dist.train
    accelerate launch --multi_gpu -m mnist_dist.train        # every GPU of this machine

Options: `python -m mnist_dist.train --help`. `train()` tells the story; each stage below is one step of it.
"""
import copy
import ctypes
import dataclasses
import hashlib
import json
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from mnist_dist import job
from mnist_dist.settings import RunError, Settings, parse_args, trackers

job.watch_launcher()  # before the imports below, which take seconds: no trainer outlives its launcher
# Run as a program, the command line is read now: --help and a bad flag answer at once, not after those imports.
PARSED = parse_args() if __name__ == "__main__" else None

import accelerate
import psutil
import torch
import torch.nn.functional as F
import torchvision
from accelerate import Accelerator, PartialState
from accelerate.tracking import WandBTracker
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, set_seed
from safetensors.torch import save
from tqdm import tqdm

from mnist_dist import checkpoint
from mnist_dist.average import BN_BATCH, BN_IMAGES, Average
from mnist_dist.checkpoint import TRAJECTORY, Progress
from mnist_dist.data import load_tensors, make_loaders, prepare_mnist
from mnist_dist.distributed import check_launch, check_launcher, join_restarted_group, set_threads, together, use_cpu
from mnist_dist.evaluate import Score, score
from mnist_dist.model import Net, count_params, graph_training_step, summary_table, sync_batchnorm, to_channels_last
from mnist_dist.plot import confusion_figure, draw_curves, mistakes_figure
from mnist_dist.schedule import Schedule

# Cross-entropy over 10 classes starts near ln(10) = 2.3 nats: a loss above this has diverged,
# even while Adam keeps the numbers finite.
DIVERGED = 1e3
# Steps between the ranks' exchanges of mean loss, divergence and stop signals. Every step would add
# a collective (and on a GPU a host sync) to each tiny step; 10 steps of a stop request cost ~0.1 s.
POLL_STEPS = 10


def reached(correct: int, total: int, target_acc: float) -> bool:
    """Whether `correct` of `total` is at least `target_acc` percent (9,941/10,000 >= 99.41)."""
    return 100 * correct / total >= target_acc


def sharding(seed: int) -> DataLoaderConfiguration:
    """One permutation per epoch, seeded identically on every rank, then split into disjoint shards."""
    return DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed)


def keep_freed_memory() -> None:
    """Let glibc keep freed memory (blocks under 32 MiB, up to 1 GiB) for the next step. By default each
    step page-faults its few MB of activations in afresh: a fifth of a CPU step here (4,800 against 6,000 img/s).
    Nothing elsewhere: macOS, Windows and musl have other allocators, and those numbers mean nothing to them."""
    if platform.libc_ver()[0] != "glibc":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD, from glibc's malloc.h
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # a glibc we cannot load by that name
        return


def write_atomic(path: Path, write, exclusive: bool = False) -> None:
    """`write(tmp)` to a temporary name beside `path`, then rename: a kill leaves the old file or none.
    `exclusive`: FileExistsError if `path` exists, so two runs cannot both claim one folder."""
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        (os.link if exclusive else os.replace)(tmp, path)
    except OSError as err:  # named: a failed write (a full disk) carries no file name
        raise OSError(err.errno, err.strerror or str(err), str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class Run:
    """What every stage shares: resolved settings, the accelerator, the run folder."""
    s: Settings
    accelerator: Accelerator
    out: Path
    info: dict  # what config.json records
    resume_from: Path | None
    data_root: Path
    t_start: float  # process start: wall_seconds include imports and set-up
    stop: "StopSignals"
    log_error: str = ""  # a tracker write that failed on the main process (a full disk), for the next poll


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


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the run stopped after a step and saved a checkpoint. Args: (signum, folder)."""


class StopSignals:
    """Turns SIGINT/SIGTERM into a request to stop after the current step; polled by every rank."""
    def __init__(self):
        self.received: list[int] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.received.append(signum)
        # Ctrl-C twice kills at once; a second SIGTERM does not: a scheduler may signal every process
        # of a job while the launcher forwards its own, and that must not cut the save.
        if signum == signal.SIGINT:
            signal.signal(signum, signal.SIG_DFL)


def split_trackers(accelerator: Accelerator) -> tuple:
    """On the main process, (TensorBoard's SummaryWriter or None, the other trackers); (None, []) elsewhere.
    TensorBoard is given its text and figures by name."""
    found = accelerator.trackers if accelerator.is_main_process else []
    tb = next((t.tracker for t in found if t.name == "tensorboard"), None)
    return tb, [t for t in found if t.name != "tensorboard"]


def hparams(info: dict) -> dict:  # what trackers take as settings
    return {k: v for k, v in info.items() if isinstance(v, (bool, int, float, str))}


def run_name(s: Settings) -> str:
    """The run folder (main process's choice): --output-dir, the run of --resume PATH, or a new
    runs/<launch time>-<launcher pid>, which a group restarted by its launcher finds again."""
    if s.output_dir:
        return s.output_dir
    if s.resume not in ("", "latest", "auto"):  # PATH: a run folder, or one of its checkpoints RUN/checkpoints/epoch_NNNN
        path = Path(s.resume).resolve()
        return str(path if (path / "checkpoints").is_dir() else path.parent.parent)
    launcher = psutil.Process()
    if job.LAUNCHED & os.environ.keys():
        launcher = launcher.parent()
    return f"runs/{datetime.fromtimestamp(launcher.create_time()):%Y%m%d-%H%M%S}-{launcher.pid}"


def restarted() -> bool:
    """Whether a scheduler restarted this job: torchrun (--max_restarts) or SLURM (a requeue, preemption)."""
    return any(int(os.environ.get(v, "0")) > 0 for v in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))


def resume_point(s: Settings, out: Path, trajectory: dict) -> Path | None:
    """The checkpoint to continue: --resume's; or with --resume auto, or in a job a scheduler restarted, the
    run folder's newest if it has one (else the run starts). The main process looks for it, so that every rank
    agrees even where only the main process sees the run folder."""
    where = s.resume
    if s.resume == "auto" or restarted():
        newest = checkpoint.newest(out) if PartialState().is_main_process else None
        where = "latest" if broadcast_object_list([newest])[0] else ""
    return together(checkpoint.find, where, out, trajectory) if where else None


def claim(out: Path, info: dict, fresh: bool) -> None:
    """Hold the run folder for this job, and write its config.json (main process); a fresh run may not reuse
    a run's folder."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        job.hold(out)
        (out / "checkpoints").mkdir(exist_ok=True)
        write_atomic(out / "config.json", lambda p: p.write_text(json.dumps(info, indent=2)), exclusive=fresh)
    except FileExistsError:
        raise RunError(f"'{out}' already holds a run. To continue it, add --resume; to start anew, pass a new "
                       "--output-dir (or leave it out for a fresh runs/<time>-<pid>).") from None
    except OSError as err:
        raise RunError(f"cannot write the run folder '{out}' ({err.strerror}); choose another --output-dir.") from None


def start_run(s: Settings) -> Run:
    """Process group, accelerator and run folder, with every input checked before anything is written."""
    t_start = psutil.Process().create_time()
    if s.resume in ("latest", "auto") and not s.output_dir:  # every rank alike, before any collective
        raise RunError(f"--resume {'auto' if s.resume == 'auto' else 'without a path'} needs --output-dir: the run "
                       "folder to continue" + (" (or give it as --resume RUN_FOLDER)." if s.resume == "latest" else "."))
    check_launcher()
    stop = StopSignals()  # first: a launcher may forward a signal while the job is still starting
    keep_freed_memory()
    threads = set_threads()
    cpu = use_cpu(torch.cuda.is_available())
    join_restarted_group(cpu, timedelta(seconds=s.timeout))
    state = PartialState(cpu=cpu, timeout=timedelta(seconds=s.timeout))
    out = Path(broadcast_object_list([run_name(s)])[0])
    log_with = trackers(s.report_to)
    if "mlflow" in log_with:  # Accelerate gives MLflow no folder: its store goes into the run folder
        os.environ.setdefault("MLFLOW_TRACKING_URI", (out / "mlruns").resolve().as_uri())
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this consent
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "mnist_dist")
    if "wandb" in log_with:  # made here: Accelerate would name W&B's project after TensorBoard's folder
        os.environ.setdefault("WANDB_DIR", str(out.resolve()))  # offline files (WANDB_MODE=offline) in the run folder
        # The id, from the folder's path, is the same when the run resumes: one W&B run, continued (resume="allow").
        run_id = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]
        log_with[log_with.index("wandb")] = WandBTracker("mnist_dist", name=out.name, id=run_id, resume="allow")
    try:  # step_scheduler_with_optimizer off: the schedule is per step at any world size
        accelerator = Accelerator(
            cpu=cpu, mixed_precision=s.mixed_precision or None, log_with=log_with, project_dir=out,
            dataloader_config=sharding(s.seed), step_scheduler_with_optimizer=False)
    except ValueError as err:  # a precision this machine cannot run: fp8 without its libraries, bf16 on an old GPU
        raise RunError(f"Accelerate cannot set up this run: {err}") from None
    check_launch(state, accelerator.mixed_precision)
    if s.cuda_graphs and (accelerator.device.type != "cuda" or accelerator.mixed_precision == "fp8"
                          or (s.sync_bn and accelerator.num_processes > 1)):
        raise RunError(f"--cuda-graphs needs a CUDA device, mixed precision no, bf16 or fp16, and no --sync-bn across "
                       f"processes; this run has {accelerator.device.type}, mixed precision {accelerator.mixed_precision}"
                       + (" and --sync-bn" if s.sync_bn and accelerator.num_processes > 1 else "") + ".")
    world = accelerator.num_processes
    if s.global_batch_size:
        if s.global_batch_size % world:
            raise RunError(f"--global-batch-size {s.global_batch_size} does not divide over {world} processes.")
        s = dataclasses.replace(s, batch_size=s.global_batch_size // world)
    info = {**dataclasses.asdict(s), "output_dir": str(out), "world_size": world, "global_batch": s.batch_size * world,
            "mixed_precision": accelerator.mixed_precision, "threads": threads,
            "distributed_type": str(accelerator.distributed_type), "device": str(accelerator.device),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "torchvision": torchvision.__version__, "accelerate": accelerate.__version__}}
    resume_from = resume_point(s, out, {k: info[k] for k in TRAJECTORY})
    data_root = together(prepare_mnist, s.data_dir)  # safe on shared storage: a file lock, atomic renames
    together(claim, out, info, not (s.resume or restarted()), main_only=True)
    return Run(s, accelerator, out, info, resume_from, data_root, t_start, stop)


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
    if s.channels_last:
        model = to_channels_last(model)
    if s.compile:
        model = torch.compile(model)
    if s.cuda_graphs:
        model = graph_training_step(model, s.batch_size, accelerator.device, accelerator.mixed_precision)
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
        run.accelerator.print(f"resumed from {run.resume_from} after epoch {progress.epoch}"
                              + (f", step {progress.batches_done}" if progress.batches_done else ""))
    return progress


def start_trackers(run: Run, parts: Parts, progress: Progress) -> None:
    """The trackers (main process), once the resume point is known. Every tracker logs at the global optimizer
    step; a resumed run continues the same TensorBoard folder and W&B run, each step once."""
    step = progress.epoch * len(parts.train) + progress.batches_done
    # purge_step: TensorBoard drops what a killed run logged after its checkpoint; this run logs those steps anew.
    # "tensorboard" names TensorBoard's folder in the run; MLflow's experiment is named above.
    run.accelerator.init_trackers("tensorboard", init_kwargs={"tensorboard": {"purge_step": step + 1},
                                                              "mlflow": {"run_name": run.out.name}})
    tb, others = split_trackers(run.accelerator)
    for tracker in others:  # TensorBoard gets the settings at the end, with the results
        tracker.store_init_configuration(hparams(run.info))
        if tracker.name == "wandb":  # W&B can draw the per-epoch scalars against the epoch
            tracker.tracker.define_metric("epoch")
            for key in ("train/*", "val/*", "lr", "seconds_per_epoch"):
                tracker.tracker.define_metric(key, step_metric="epoch")
    if tb and not step:
        tb.add_text("model/summary", "    " + parts.summary.replace("\n", "\n    "), 0)  # a markdown code block


def log(run: Run, values: dict, step: int) -> None:
    """accelerator.log; a write that fails (a full disk) stops every rank at the next poll instead of one now."""
    try:
        run.accelerator.log(values, step=step)
    except OSError as err:
        run.log_error = run.log_error or f"cannot write the trackers' logs in '{run.out}' ({err.strerror})"


def poll(run: Run, progress: Progress, window: torch.Tensor, local: torch.Tensor, done: int, steps: int,
         lr: float) -> None:
    """Every POLL_STEPS steps, one small all-reduce: the global mean loss, and the flags every rank
    must act on alike (a diverged loss, a failed log write, a stop signal). Its `.tolist()` is the one time
    in POLL_STEPS steps that a GPU's host waits for the device."""
    acc, stop = run.accelerator, run.stop
    # fill_ takes a number by value; a tensor made of the flags would be a copy from the host, and a wait.
    window[3].fill_(bool(run.log_error))
    window[4].fill_(bool(stop.received))
    loss_sum, bad_loss, steps_summed, log_failed, interrupted = acc.reduce(window, "sum").tolist()
    if log_failed:
        last = checkpoint.newest(run.out)
        raise RunError(f"{run.log_error}; training stopped. " + (f"Once it can be written, continue with --resume "
                                                                 f"{last}." if last else "No checkpoint was saved yet."))
    log(run, {"step/loss": loss_sum / steps_summed, "step/lr": lr}, progress.epoch * steps + done)
    window.zero_()
    if bad_loss:
        last = checkpoint.newest(run.out)
        raise RunError(f"the loss diverged at epoch {progress.epoch + 1}, by step {done} of {steps}; training "
                       f"stopped. Lower --lr (now {run.s.lr})" + (f" and resume from '{last}', which is kept, "
                       "or start anew." if last else " and start anew."))
    if interrupted:
        progress.carried = (acc.reduce(local.clone(), "sum").cpu() + torch.tensor(progress.carried)).tolist()
        progress.batches_done = done
        saved = checkpoint.save(acc, run.out, progress, run.s.keep_checkpoints)
        raise Interrupted(stop.received[0] if stop.received else signal.SIGTERM, saved)


def train_epoch(run: Run, parts: Parts, progress: Progress) -> list[float]:
    """One epoch, or what is left of it after a mid-epoch resume.
    Returns (loss x images, correct, images) summed over every rank and the whole epoch."""
    acc, steps, done = run.accelerator, len(parts.train), progress.batches_done
    parts.model.train()
    parts.train.set_epoch(progress.epoch + 1)
    batches = acc.skip_first_batches(parts.train, done) if done else parts.train
    # Sums kept on the device, so that no step waits for it; `new_tensor(1)` would copy from the host.
    local = torch.zeros(3, device=acc.device)  # this rank's loss x images, correct, images
    window = torch.zeros(5, device=acc.device)  # since the last poll: loss sum, bad losses, steps; poll's 2 flags
    one = torch.ones((), device=acc.device)
    show = acc.is_main_process and sys.stderr.isatty()
    bar = tqdm(batches, desc=f"epoch {progress.epoch + 1}", initial=done, total=steps, leave=False,
               disable=not show, unit="batch")
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
        if done % POLL_STEPS == 0 or done == steps:
            poll(run, progress, window, local, done, steps, parts.optimizer.param_groups[0]["lr"])
            if show:
                loss_sum, hits, seen = local.tolist()
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{100 * hits / seen:.2f}%",
                                img_s=f"{seen * acc.num_processes / (time.perf_counter() - t0):,.0f}")
    return (acc.reduce(local, "sum").cpu() + torch.tensor(progress.carried)).tolist()


def evaluated(run: Run, parts: Parts) -> torch.nn.Module:
    """The network that evaluation scores, the stop looks at and the run saves: the average of the weights
    (--ema), or the trained network. Every rank must call it. Either way every rank scores the network rank 0
    saves: the trained one's BatchNorm statistics are DDP's broadcast of rank 0's (broadcast_buffers, its
    default, before each forward pass, evaluation's included), and the average broadcasts its own."""
    return parts.average.ready(run.accelerator) if parts.average else parts.model


def end_epoch(run: Run, parts: Parts, progress: Progress, totals: list[float], t0: float) -> Score:
    """Evaluate, record the epoch in the history, the trackers and the log, and save a checkpoint."""
    acc, s = run.accelerator, run.s
    train_seconds = time.perf_counter() - t0
    val = score(evaluated(run, parts), parts.val, acc)
    loss_sum, hits, seen = totals
    row = {"epoch": progress.epoch + 1, "train_loss": loss_sum / seen, "train_acc": 100 * hits / seen,
           "val_loss": val.loss, "val_acc": 100 * val.correct / val.total, "seconds": time.perf_counter() - t0,
           "train_seconds": train_seconds, "train_images": int(seen), "val_correct": val.correct,
           "val_total": val.total, "elapsed": time.time() - run.t_start}
    progress.history.append(row)
    progress.epoch, progress.batches_done, progress.carried = row["epoch"], 0, [0.0, 0.0, 0.0]
    # At the epoch's last optimizer step, the axis of every tracker: W&B drops a step lower than the last one.
    log(run, {"epoch": row["epoch"], "train/loss": row["train_loss"], "train/acc": row["train_acc"],
              "val/loss": row["val_loss"], "val/acc": row["val_acc"], "lr": parts.optimizer.param_groups[0]["lr"],
              "seconds_per_epoch": row["seconds"]}, row["epoch"] * len(parts.train))
    acc.print(f"epoch {row['epoch']:2d}/{s.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:6.2f}%  "
              f"val loss {row['val_loss']:.4f} acc {row['val_acc']:6.2f}% ({val.correct}/{val.total})  "
              f"{row['seconds']:.1f} s")
    checkpoint.save(acc, run.out, progress, s.keep_checkpoints)
    return val


def met(progress: Progress, target_acc: float) -> bool:
    """Whether the last completed epoch reached the target (a resumed run that did trains no further)."""
    last = progress.history[-1] if progress.history and not progress.batches_done else None
    return bool(last) and reached(last["val_correct"], last["val_total"], target_acc)


def write_outputs(run: Run, net: torch.nn.Module, metrics: dict) -> None:
    """The main process's files: the weights of `net`, metrics and the graph, each written whole or not at all."""
    # The plain Net's parameter names, also under --compile, so evaluate/predict load them.
    weights = run.accelerator.unwrap_model(net, keep_torch_compile=False).state_dict()
    # channels_last weights are strided views; safetensors stores contiguous tensors. Serialised in
    # memory and written by Python, so that a full disk is an OSError naming the file.
    data = save({k: v.contiguous() for k, v in weights.items()})
    write_atomic(run.out / "model.safetensors", lambda p: p.write_bytes(data))
    write_atomic(run.out / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2)))
    write_atomic(run.out / "curves.png", lambda p: draw_curves({run.out.name: metrics}, p))


def log_final_report(run: Run, final: Score, metrics: dict, step: int) -> None:
    """The trackers at the end (main process), at the last optimizer `step`: the final metrics; TensorBoard
    also gets the settings as hparams with them, the misclassified digits and the confusion matrix."""
    results = {f"hparam/{k}": float(metrics[k]) for k in ("final_val_acc", "stop_epoch", "wall_seconds", "reached_target")}
    tb, others = split_trackers(run.accelerator)
    for tracker in others:
        tracker.log(results, step=step)
    if tb is None:
        return
    images, _ = load_tensors(run.data_root, train=False, limit=run.s.test_limit)
    wrong = (final.pred != final.true).nonzero().flatten()
    tb.add_figure("test/mistakes", mistakes_figure(images[wrong], final.true[wrong], final.pred[wrong]), step)
    tb.add_figure("test/confusion_matrix", confusion_figure(final.confusion()), step)
    tb.add_hparams(hparams(run.info), results)


def finish(run: Run, parts: Parts, progress: Progress, last: Score | None) -> dict:
    """The final metrics; the main process writes the run's files and the trackers' report."""
    s, acc = run.s, run.accelerator
    # The test set scored once more only if the loop has not just done it.
    tested = parts.test is not None
    net = evaluated(run, parts)
    final = score(net, parts.test if tested else parts.val, acc) if tested or last is None else last
    row = progress.history[-1]
    metrics = {"params": count_params(parts.model), "target_acc": s.target_acc,
               "reached_target": reached(row["val_correct"], row["val_total"], s.target_acc),
               "stop_epoch": row["epoch"], "world_size": acc.num_processes, "mixed_precision": acc.mixed_precision,
               "wall_seconds": time.time() - run.t_start, "final_val_acc": row["val_acc"],
               "validation": f"{s.val_split} held-out training images" if s.val_split else "test set",
               "weights": (f"exponential moving average, decay {s.ema} per step, BatchNorm statistics recomputed on "
                           f"{len(parts.average.images.dataset)} training images") if s.ema else "trained",
               "epochs": progress.history}
    if tested:
        metrics["test_acc"] = 100 * final.correct / final.total
    try:
        together(write_outputs, run, net, metrics, main_only=True)
        together(log_final_report, run, final, metrics, progress.epoch * len(parts.train), main_only=True)
    except RunError as err:
        raise RunError(f"{err}. The checkpoint '{checkpoint.newest(run.out)}' is complete: once there is room, "
                       "the same command with --resume writes the run's files.") from None
    acc.end_training()
    acc.print(f"{'reached' if metrics['reached_target'] else 'did not reach'} {s.target_acc}%: epoch {row['epoch']}, "
              f"val acc {row['val_acc']:.2f}%" + (f", test acc {metrics['test_acc']:.2f}%" if tested else "")
              + f", {metrics['wall_seconds']:.1f} s, run folder {run.out}")
    return metrics


def train(s: Settings) -> dict:
    """Train until validation accuracy reaches `s.target_acc` or `s.epochs` run out; return the metrics."""
    run = start_run(s)
    parts = build(run)
    progress = resume_or_start(run, parts)
    start_trackers(run, parts, progress)
    run.accelerator.print(f"{count_params(parts.model):,} parameters | {run.info['world_size']} process(es), "
                          f"{run.accelerator.distributed_type}, {run.info['threads']} thread(s) each, precision "
                          f"{run.accelerator.mixed_precision} | global batch {run.info['global_batch']}, "
                          f"{len(parts.train)} steps/epoch | run folder {run.out}")
    last = None
    job.training.set()  # a launcher that dies from now on gets a checkpoint
    while progress.epoch < run.s.epochs and not met(progress, run.s.target_acc):
        t0 = time.perf_counter()
        totals = train_epoch(run, parts, progress)
        last = end_epoch(run, parts, progress, totals, t0)
        if met(progress, run.s.target_acc):
            run.accelerator.set_trigger()
        if run.accelerator.check_trigger():  # a sum over ranks: every rank leaves on the same epoch
            break
    return finish(run, parts, progress, last)


def main(argv: list[str] | None = None, settings: Settings | None = None) -> int:
    settings = settings or parse_args(argv)
    code = 0
    try:
        train(settings)
    except RunError as err:
        job.say(f"mnist_dist: error: {err}")
        code = 2
    except Interrupted as stop:
        signum, saved = stop.args
        again = "the same command" + ("" if settings.resume == "auto" else f" plus --resume {saved}")
        job.say(f"mnist_dist: stopped by {signal.Signals(signum).name}; saved {saved}. Continue with {again}")
        code = 128 + signum  # the shell convention: 130 for SIGINT, 143 for SIGTERM
    except (torch.distributed.DistError, RuntimeError) as err:
        if not (isinstance(err, torch.distributed.DistError) or "gloo" in str(err)):
            raise  # a bug: its traceback is the report
        # A collective failed: another process of the job is gone, and its own error says why.
        print(f"mnist_dist: error: process {os.environ.get('RANK', '?')} lost the job's other processes "
              f"({str(err).strip().splitlines()[0][:200]})", file=sys.stderr)
        code = 1
    # train() ends the process group when it finishes; these exits must too. One left for the interpreter's
    # shutdown can abort with SIGABRT ("terminate called without an active exception": gloo's threads).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return code


if __name__ == "__main__":
    job.leave(main(settings=PARSED))
