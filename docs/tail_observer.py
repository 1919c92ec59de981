"""The slow tail, observed: one run of the default recipe, scored at every half epoch and epoch end from
epoch 3 on with several inference variants, without changing its trajectory. One JSON line per point,
among the run's own log lines on stdout (docs/benchmarks.md, "The slow tail", has the results).

    OMP_NUM_THREADS=1 python docs/tail_observer.py --seed 3 --epochs 6 --target-acc 100 --report-to none \
        --data-dir data --output-dir /tmp/tail/s3 > /tmp/tail/s3.jsonl

Variants, each a count of correct test images out of 10,000:
- plain: the network as training leaves it (at an epoch end, what the run reports with `--ema 0`);
- tta5: the log-probabilities of the image and its four one-pixel shifts (torch.roll), summed;
- ema<d>: an exponential moving average of the weights (decay d per optimizer step,
  torch.optim.swa_utils.AveragedModel), its BatchNorm statistics recomputed (update_bn) on the first 4,096
  training images without augmentation.
The observer draws no random numbers from the training's generators and touches no training state (the RNG
state is restored anyway), so the run's own epochs are those of a run without it.
"""
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

import mnist_dist.train as T

DECAYS = (0.995, 0.998, 0.999)
FIRST = 3  # no seed measured so far reached 99.41% before epoch 3
BN_IMAGES = 4096
state: dict = {}


def log_probs(model, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([F.log_softmax(model(chunk).float(), 1) for chunk in x.split(1000)])


def correct(logp: torch.Tensor, y: torch.Tensor) -> int:
    return int((logp.argmax(1) == y).sum())


@torch.no_grad()
def observe(point: float) -> None:
    parts, rng, t0 = state["parts"], torch.random.get_rng_state(), time.perf_counter()
    test = parts.val.dataset
    row = {"seed": state["seed"], "point": point}
    parts.model.eval()
    plain = log_probs(parts.model, test.x)
    shifted = sum(log_probs(parts.model, test.x.roll(s, d)) for d in (2, 3) for s in (1, -1))
    row["plain"], row["tta5"] = correct(plain, test.y), correct(plain + shifted, test.y)
    bn_batches = list(parts.train.dataset.x[:BN_IMAGES].split(256))
    for d, ema in state["emas"].items():
        update_bn(bn_batches, ema)
        ema.eval()
        row[f"ema{d}"] = correct(log_probs(ema, test.x), test.y)
    parts.model.train()
    torch.random.set_rng_state(rng)
    row["observer_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(row), flush=True)


def train_epoch(run, parts, progress):
    if "emas" not in state:  # the first epoch: averages of the network, updated after every optimizer step
        state["parts"], state["seed"] = parts, run.s.seed
        state["emas"] = {d: AveragedModel(parts.model, multi_avg_fn=get_ema_multi_avg_fn(d)) for d in DECAYS}
        step = parts.optimizer.step

        def step_and_average(*args, **kwargs):
            result = step(*args, **kwargs)
            for ema in state["emas"].values():
                ema.update_parameters(parts.model)
            return result
        parts.optimizer.step = step_and_average
    return TRAIN_EPOCH(run, parts, progress)


def poll(run, progress, window, local, done, steps, lr):
    POLL(run, progress, window, local, done, steps, lr)
    if progress.epoch + 1 > FIRST and steps // 2 <= done < steps and state.get("half") != progress.epoch:
        state["half"] = progress.epoch
        observe(progress.epoch + 0.5)


def end_epoch(run, parts, progress, totals, t0):
    score = END_EPOCH(run, parts, progress, totals, t0)
    if progress.epoch >= FIRST:
        observe(progress.epoch)
    return score


TRAIN_EPOCH, POLL, END_EPOCH = T.train_epoch, T.poll, T.end_epoch
T.train_epoch, T.poll, T.end_epoch = train_epoch, poll, end_epoch

if __name__ == "__main__":
    sys.exit(T.main(sys.argv[1:]))
