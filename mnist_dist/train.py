"""Train the seed's CNN on MNIST with Hugging Face Accelerate, stopping at the target accuracy.

    python -m mnist_dist.train                  # one process, CPU or one GPU
    accelerate launch -m mnist_dist.train       # as `accelerate config` / --config_file says
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m mnist_dist.train

Every option is listed by `python -m mnist_dist.train --help`.
"""
import ctypes
import dataclasses
import json
import math
import os
import platform
import signal
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import accelerate
import psutil
import torch
import torch.nn.functional as F
import torchvision
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, set_seed
from safetensors.torch import save_file
from tqdm import tqdm

from mnist_dist import checkpoint
from mnist_dist.data import DeviceMNIST, load_tensors, make_loaders, prepare_mnist
from mnist_dist.model import Net, count_params, summary_table, sync_batchnorm, to_channels_last
from mnist_dist.plot import confusion_figure, draw_curves, mistakes_figure
from mnist_dist.settings import RunError, Settings, parse_args


# Cross-entropy over 10 classes starts near ln(10) = 2.3 nats; a step above this
# has diverged, even where the numbers are still finite (Adam keeps them so for a while).
DIVERGED = 1e3
# The ranks compare notes (mean loss for TensorBoard, divergence, a stop signal) every this
# many steps and at the end of an epoch. Every step would add a collective, and on a GPU a
# host sync, to each step of a network this small; 10 steps of a stop request cost ~0.1 s.
POLL_STEPS = 10


def reached(correct: int, total: int, target_acc: float) -> bool:
    """Whether `correct` of `total` is at least `target_acc` percent (9,941/10,000 >= 99.41)."""
    return 100 * correct / total >= target_acc


def sharding(seed: int) -> DataLoaderConfiguration:
    """One permutation per epoch, seeded identically on every rank, then split into disjoint shards."""
    return DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed)


def keep_freed_memory() -> None:
    """Let glibc keep freed tensor memory for the next step instead of returning it to the OS.

    Every step allocates and frees activations of a few MB. By default glibc
    serves such blocks with mmap or trims the heap once they are freed, so each
    step page-faults its memory in afresh: a fifth of a CPU step at batch 128 on
    this net (about 6,000 against 4,800 images/s measured). Blocks under 32 MiB
    now come from the heap, which keeps up to 1 GiB free. Does nothing without glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_mmap_threshold, 32 << 20)


def check_launch(state: PartialState, mixed_precision: str) -> None:
    """Refuse the launch modes that would silently train the wrong thing."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and state.num_processes == 1:
        raise RunError(
            f"{launched} processes were launched but Accelerate sees a single process, so every one "
            "would train on all the data and write the same files. On a machine without GPUs use "
            "'ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m mnist_dist.train' "
            "(with torchrun, set ACCELERATE_USE_CPU=1)."
        )
    if mixed_precision == "fp16" and state.device.type == "cpu":
        raise RunError(
            "fp16 mixed precision needs a CUDA GPU; on the CPU Accelerate would silently train in fp32. "
            "Use --mixed_precision bf16 (CPU autocast) or no."
        )


def claim_output_dir(s: Settings, state: PartialState) -> Path:
    """Agree on the run folder across ranks; refuse one that cannot be written, or that holds a run unless resuming."""
    if s.output_dir:
        name = s.output_dir
    elif s.resume not in ("", "latest"):
        name = str(Path(s.resume).resolve().parent.parent)  # RUN/checkpoints/epoch_NNNN -> RUN
    else:
        name = f"runs/{datetime.now():%Y%m%d-%H%M%S}"
    msg = [name, None]
    if state.is_main_process:
        out = Path(name)
        try:
            if s.resume == "latest" and not s.output_dir:
                msg[1] = "--resume without a path needs --output-dir: the run folder to continue."
            elif (out / "config.json").exists() and not s.resume:
                msg[1] = (f"'{out}' already holds a run. To continue it, add --resume; to start anew, "
                          "pass a new --output-dir (or leave it out for a fresh runs/<timestamp>).")
            else:
                out.mkdir(parents=True, exist_ok=True)
                (out / ".write-test").touch()
                (out / ".write-test").unlink()
        except OSError as err:
            msg[1] = f"cannot write the run folder '{out}' ({err.strerror}); choose another --output-dir."
    broadcast_object_list(msg)  # every rank must raise together, or the others hang
    if msg[1]:
        raise RunError(msg[1])
    return Path(msg[0])


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the run stopped after a step and saved a checkpoint."""

    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(signum, checkpoint)
        self.signum, self.checkpoint = signum, checkpoint


def catch_stop_signals() -> list[int]:
    """Turn the first SIGINT/SIGTERM into a request to stop after the current step; a second one kills."""
    received: list[int] = []

    def handler(signum, frame):
        received.append(signum)
        signal.signal(signum, signal.SIG_DFL)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return received


@torch.inference_mode()
def evaluate(model, loader, accelerator: Accelerator) -> tuple[float, int, int]:
    """(mean loss, correct, total) over the whole loader, identical on every rank.

    `gather_for_metrics` drops the samples that the sharded loader repeated to
    give every rank equal batches, so each image counts exactly once.
    """
    model.eval()
    loss_sum, correct, total = 0.0, 0, 0
    for x, y in loader:
        logits = model(x)
        losses, hits = accelerator.gather_for_metrics(
            (F.cross_entropy(logits.float(), y, reduction="none"), logits.argmax(1) == y))
        loss_sum += losses.sum().item()
        correct += int(hits.sum())
        total += len(hits)
    return loss_sum / total, correct, total


@torch.inference_mode()
def log_final_report(accelerator: Accelerator, net, root: Path, s: Settings, run_info: dict, metrics: dict) -> None:
    """TensorBoard at the end (main process): hparams with the final metrics, mistakes, confusion matrix."""
    tb = accelerator.get_tracker("tensorboard", unwrap=True)
    test = DeviceMNIST(*load_tensors(root, train=False, limit=s.test_limit), accelerator.device)
    net.eval()
    pred = torch.cat([net(x).argmax(1) for x in test.x.split(s.eval_batch_size)])
    wrong = (pred != test.y).nonzero().flatten()
    confusion = torch.bincount(test.y * 10 + pred, minlength=100).view(10, 10).cpu()
    step = metrics["stop_epoch"]
    tb.add_figure("test/mistakes", mistakes_figure(test.x[wrong].cpu(), test.y[wrong], pred[wrong]), step)
    tb.add_figure("test/confusion_matrix", confusion_figure(confusion), step)
    hparams = {k: v for k, v in run_info.items() if isinstance(v, (bool, int, float, str))}
    tb.add_hparams(hparams, {f"hparam/{k}": float(metrics[k]) for k in
                             ("final_val_acc", "stop_epoch", "wall_seconds", "reached_target")})


def train(s: Settings) -> dict:
    """Train until validation accuracy reaches `s.target_acc` or `s.epochs` run out; return the metrics."""
    t_start = psutil.Process().create_time()  # wall_seconds count from process start, imports included
    keep_freed_memory()
    # The process group comes first: the ranks must agree on the run folder
    # before the Accelerator, whose TensorBoard tracker needs it, exists.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=s.timeout))
    out = claim_output_dir(s, state)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=s.mixed_precision or None,
        log_with="tensorboard",
        project_dir=out,
        dataloader_config=sharding(s.seed),
        # The schedule below is defined per optimizer step, whatever the process count.
        step_scheduler_with_optimizer=False,
    )
    check_launch(state, accelerator.mixed_precision)
    world = accelerator.num_processes
    if s.global_batch_size:
        if s.global_batch_size % world:
            raise RunError(f"--global-batch-size {s.global_batch_size} does not divide over {world} processes.")
        s = dataclasses.replace(s, batch_size=s.global_batch_size // world)
    run_info = {**s.as_flat_dict(), "output_dir": str(out), "world_size": world,
                "global_batch": s.batch_size * world, "mixed_precision": accelerator.mixed_precision,
                "distributed_type": str(accelerator.distributed_type), "device": str(accelerator.device)}
    # The settings go to TensorBoard as hparams at the end, with the final metrics.
    accelerator.init_trackers("tensorboard")
    if accelerator.is_main_process:
        versions = {"python": platform.python_version(), "torch": torch.__version__,
                    "torchvision": torchvision.__version__, "accelerate": accelerate.__version__}
        (out / "config.json").write_text(json.dumps({**run_info, "versions": versions}, indent=2))

    set_seed(s.seed)  # the same initial weights on every rank
    with accelerator.local_main_process_first():  # one process per machine fetches or extracts files
        root = prepare_mnist(s.data_dir)
    train_loader, val_loader, test_loader = make_loaders(s, root, accelerator.device)

    model = Net(s.dropout)
    n_params = count_params(model)
    table = summary_table(model)
    accelerator.print(table)
    accelerator.log({"model/summary": "    " + table.replace("\n", "\n    ")}, step=0)  # markdown code block
    if s.sync_bn and world > 1:
        model = sync_batchnorm(model)
    if s.channels_last:
        model = to_channels_last(model)
    if s.compile:
        model = torch.compile(model)
    # fused: one kernel over all 16 parameter tensors instead of a dozen small ops per tensor;
    # with 9,720 parameters, Adam's cost is per-op overhead, not arithmetic.
    optimizer = torch.optim.Adam(model.parameters(), lr=s.lr, fused=True)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    if test_loader is not None:  # --val-split: the test set is evaluated once, at the end
        test_loader = accelerator.prepare(test_loader)
    steps_per_epoch = len(train_loader)
    schedule_steps = steps_per_epoch * min(s.schedule_epochs, s.epochs)
    scheduler = accelerator.prepare(
        torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=s.lr, total_steps=schedule_steps))
    set_seed(s.seed, device_specific=True)  # distinct dropout masks and rotations per rank

    # Progress: epochs completed, batches into the next one, and that epoch's partial sums.
    progress = {"epoch": 0, "batches_done": 0, "sums": [0.0, 0.0], "seen": 0, "history": []}
    if s.resume:
        progress = checkpoint.load(accelerator, checkpoint.find(s.resume, out))
        accelerator.print(f"resumed from {out} after epoch {progress['epoch']}"
                          + (f", step {progress['batches_done']}" if progress["batches_done"] else ""))
    history = progress["history"]
    step = progress["epoch"] * steps_per_epoch + progress["batches_done"]  # optimizer steps so far
    stop_signals = catch_stop_signals()
    accelerator.print(f"{n_params:,} parameters | {world} process(es), {accelerator.distributed_type}, "
                      f"precision {accelerator.mixed_precision} | global batch {s.batch_size * world}, "
                      f"{steps_per_epoch} steps/epoch | run folder {out}")
    show_bar = accelerator.is_main_process and sys.stderr.isatty()
    # A run resumed after it met the target has nothing left to train.
    met = bool(history) and not progress["batches_done"] and reached(
        history[-1]["val_correct"], history[-1]["val_total"], s.target_acc)
    for epoch in range(progress["epoch"] + 1, (progress["epoch"] if met else s.epochs) + 1):
        t0 = time.perf_counter()
        model.train()
        train_loader.set_epoch(epoch)
        done = progress["batches_done"] if epoch == progress["epoch"] + 1 else 0
        batches = accelerator.skip_first_batches(train_loader, done) if done else train_loader
        # loss * n and correct, kept on the device: no sync per step.
        sums = torch.tensor(progress["sums"] if done else [0.0, 0.0], device=accelerator.device)
        seen = progress["seen"] if done else 0
        bar = tqdm(batches, desc=f"epoch {epoch}", initial=done, total=steps_per_epoch, leave=False,
                   disable=not show_bar, unit="batch")
        window, polled = torch.zeros(2, device=accelerator.device), done  # loss sum, bad losses since the last poll
        for x, y in bar:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            if step < schedule_steps:
                scheduler.step()
            elif s.tail_lr:
                # The cycle ended below the target. At its floor (lr/250,000) nothing would change
                # any more. Each further epoch is a short warm restart, annealed again by its end,
                # where it is evaluated. In trials, two runs that ended the cycle 0.06 and 0.08 points
                # short got there 1 and 4 epochs later; on a constant 1% of --lr, 5 and over 15.
                k = (step - schedule_steps) % steps_per_epoch
                for group in optimizer.param_groups:
                    group["lr"] = s.lr * s.tail_lr * 0.5 * (1 + math.cos(math.pi * k / steps_per_epoch))
            step += 1
            done += 1
            sums += torch.stack([loss.detach() * len(y), (logits.argmax(1) == y).sum()])
            seen += len(y)
            window += torch.stack([loss.detach(), ~(loss.detach() < DIVERGED)])  # the flag is also set by nan
            if done % POLL_STEPS and done < steps_per_epoch:
                continue
            # One small all-reduce per poll: the global mean loss, and flags that every rank must act on alike.
            flags = torch.cat([window, window.new_tensor([bool(stop_signals)])])
            loss_sum, bad_loss, interrupted = accelerator.reduce(flags, "sum").tolist()
            accelerator.log({"step/loss": loss_sum / (world * (done - polled)),
                             "step/lr": optimizer.param_groups[0]["lr"]}, step=step)
            window.zero_()
            polled = done
            if bad_loss:
                raise RunError(f"the loss diverged ({loss.item():.3g}) at epoch {epoch}, by step {done} of "
                               f"{steps_per_epoch}; training stopped and the last good checkpoint in "
                               f"'{out / 'checkpoints'}' is kept. Lower --lr (now {s.lr}) and resume from it, "
                               "or start anew.")
            if interrupted:
                partial = {"epoch": epoch - 1, "batches_done": done, "sums": sums.tolist(), "seen": seen,
                           "history": history}
                saved = checkpoint.save(accelerator, out, partial, s.keep_checkpoints)
                raise Interrupted(stop_signals[0] if stop_signals else signal.SIGTERM, saved)
            if show_bar:
                epoch_loss, hits = sums.tolist()
                bar.set_postfix(loss=f"{epoch_loss / seen:.4f}", acc=f"{100 * hits / seen:.2f}%",
                                img_s=f"{seen * world / (time.perf_counter() - t0):,.0f}")
        # Global training metrics: summed over every rank, not rank 0's share.
        loss_sum, hits, seen = accelerator.reduce(torch.cat([sums, sums.new_tensor([seen])]), "sum").tolist()
        train_seconds = time.perf_counter() - t0
        # BatchNorm running statistics drift apart per rank; average them so that
        # every rank evaluates, and rank 0 saves, the same model.
        if world > 1:
            for buf in accelerator.unwrap_model(model).buffers():
                if buf.is_floating_point():
                    buf.copy_(accelerator.reduce(buf.clone(), "mean"))
        val_loss, correct, total = evaluate(model, val_loader, accelerator)
        row = {"epoch": epoch, "train_loss": loss_sum / seen, "train_acc": 100 * hits / seen,
               "val_loss": val_loss, "val_acc": 100 * correct / total, "seconds": time.perf_counter() - t0,
               "train_seconds": train_seconds, "train_images": int(seen), "val_correct": correct, "val_total": total,
               "elapsed": time.time() - t_start}
        history.append(row)
        accelerator.log({"train/loss": row["train_loss"], "train/acc": row["train_acc"],
                         "val/loss": row["val_loss"], "val/acc": row["val_acc"],
                         "lr": optimizer.param_groups[0]["lr"], "seconds_per_epoch": row["seconds"]}, step=epoch)
        accelerator.print(f"epoch {epoch:2d}/{s.epochs}  train loss {row['train_loss']:.4f} acc "
                          f"{row['train_acc']:6.2f}%  val loss {row['val_loss']:.4f} acc {row['val_acc']:6.2f}% "
                          f"({correct}/{total})  {row['seconds']:.1f} s")
        checkpoint.save(accelerator, out, {"epoch": epoch, "batches_done": 0, "sums": [0.0, 0.0], "seen": 0,
                                           "history": history}, s.keep_checkpoints)
        if reached(correct, total, s.target_acc):
            accelerator.set_trigger()
        if accelerator.check_trigger():  # a sum over ranks: every rank leaves on the same epoch
            break

    last = history[-1]
    metrics = {"params": n_params, "target_acc": s.target_acc,
               "reached_target": reached(last["val_correct"], last["val_total"], s.target_acc),
               "stop_epoch": last["epoch"], "world_size": world, "mixed_precision": accelerator.mixed_precision,
               "wall_seconds": time.time() - t_start, "final_val_acc": last["val_acc"],
               "validation": f"{s.val_split} held-out training images" if s.val_split else "test set",
               "epochs": history}
    if test_loader is not None:
        _, test_correct, test_total = evaluate(model, test_loader, accelerator)
        metrics["test_acc"] = 100 * test_correct / test_total
    if accelerator.is_main_process:
        # The plain Net's parameter names, also under --compile, so evaluate/predict load them.
        weights = accelerator.unwrap_model(model, keep_torch_compile=False).state_dict()
        # channels_last weights are strided views; safetensors stores contiguous tensors.
        save_file({k: v.contiguous() for k, v in weights.items()}, out / "model.safetensors")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        draw_curves({out.name: metrics}, out / "curves.png")
        log_final_report(accelerator, accelerator.unwrap_model(model), root, s, run_info, metrics)
    accelerator.end_training()
    accelerator.print(f"{'reached' if metrics['reached_target'] else 'did not reach'} {s.target_acc}%: "
                      f"epoch {last['epoch']}, val acc {last['val_acc']:.2f}%"
                      + (f", test acc {metrics['test_acc']:.2f}%" if "test_acc" in metrics else "")
                      + f", {metrics['wall_seconds']:.1f} s, "
                      f"run folder {out}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    code = 0
    try:
        train(settings)
    except RunError as err:
        print(f"mnist_dist: error: {err}", file=sys.stderr)
        code = 2
    except Interrupted as stop:
        if PartialState().is_main_process:
            print(f"mnist_dist: stopped by {signal.Signals(stop.signum).name}; saved {stop.checkpoint}. "
                  f"Continue with the same command plus --resume {stop.checkpoint}", file=sys.stderr)
        code = 128 + stop.signum  # the shell convention: 130 for SIGINT, 143 for SIGTERM
    # train() ends the process group when it finishes; these exits must too. One left for the
    # interpreter's shutdown can abort the process ("terminate called without an active
    # exception": gloo's threads outlive Python's), turning exit code 2 into a SIGABRT.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
