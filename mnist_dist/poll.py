"""What the ranks exchange while they train: every POLL_STEPS steps, one small all-reduce carries the mean loss
to log and the flags that every rank must act on alike (a diverged loss, a tracker that failed, a stop signal), so
that no rank raises, stops or saves alone.
"""
import signal

import torch
from accelerate import Accelerator

from mnist_dist import checkpoint
from mnist_dist.checkpoint import Progress
from mnist_dist.errors import Interrupted, RunError

# Cross-entropy over 10 classes starts near ln(10) = 2.3 nats: a loss above this has diverged,
# even while Adam keeps the numbers finite.
DIVERGED = 1e3
# Steps between the ranks' exchanges of mean loss, divergence and stop signals. Every step would add
# a collective (and on a GPU a host sync) to each tiny step; 10 steps of a stop request cost ~0.1 s.
POLL_STEPS = 10


def poll(run, progress: Progress, window: torch.Tensor, local: torch.Tensor, done: int, steps: int,
         lr: float) -> None:
    """Every POLL_STEPS steps, one small all-reduce: the global mean loss, and the flags every rank
    must act on alike (a diverged loss, a failed log write, a stop signal). Its `.tolist()` is the one time
    in POLL_STEPS steps that a GPU's host waits for the device."""
    acc, s = run.accelerator, run.s
    # fill_ takes a number by value; a tensor made of the flags would be a copy from the host, and a wait.
    window[3].fill_(bool(run.trackers.error))
    window[4].fill_(bool(run.stop.received))
    loss_sum, bad_loss, steps_summed, log_failed, interrupted = acc.reduce(window, "sum").tolist()
    if log_failed:
        last = checkpoint.newest(run.out)
        then = f"Once it can be written, continue with --resume {last}." if last else "No checkpoint was saved yet."
        raise RunError(f"{run.trackers.error or 'a tracker failed on the main process'}; training stopped. {then}")
    run.trackers.log({"step/loss": loss_sum / steps_summed, "step/lr": lr}, progress.epoch * steps + done)
    window.zero_()
    if bad_loss:  # a lower --lr is another trajectory, which no checkpoint of this run can continue
        new = f" --output-dir {run.out}-lr{s.lr / 2:g}" if s.output_dir or s.resume else ""  # not this run's folder
        raise RunError(f"the loss diverged at epoch {progress.epoch + 1}, by step {done} of {steps}; training stopped. "
                       f"Start anew with a lower learning rate: the same command{' without --resume' * bool(s.resume)}, "
                       f"plus --lr {s.lr / 2:g}{new}.")
    if interrupted:
        progress.carried, progress.batches_done = since_row(acc, local, progress), done
        progress.seconds = run.spent()
        saved = checkpoint.save(acc, run.out, progress, s.keep_checkpoints)
        raise Interrupted(run.stop.received[0] if run.stop.received else signal.SIGTERM, saved)


def since_row(acc: Accelerator, local: torch.Tensor, progress: Progress) -> list[float]:
    """The training sums since the history's last row (loss x images, correct, images), over every rank: this
    rank's `local` ones, and those carried over a mid-epoch resume. Every rank must call it."""
    return (acc.reduce(local.clone(), "sum").cpu() + torch.tensor(progress.carried)).tolist()
