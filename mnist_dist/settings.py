"""What to train: one flat dataclass, from which the command line is generated, and its resolution against
where the run is. Where to run (processes, machines, precision) belongs to `accelerate launch` and its config.
Each field's help gives its unit and scope. A run replays from its config.json (`--config runs/X/config.json`);
command-line flags still win.
"""
import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mnist_dist.errors import RunError


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


# Trackers with an extra in pyproject.toml; any other installs as the package of the tracker's name.
EXTRAS = ("mlflow", "wandb")


def trackers(report_to: str) -> list[str]:
    """The tracker names for Accelerator(log_with=...) that --report-to asks for. RunError for a name Accelerate
    does not know or whose package is missing: Accelerate would skip that tracker silently and train anyway."""
    # Imported here: accelerate pulls in torch, which `--help` does not need.
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    installed = [str(t) for t in get_available_trackers()]
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    if names == ["all"]:
        return installed
    if names == ["none"]:
        return []
    known = [n for n in LoggerType.list() if n != "all"]
    for name in names:
        if name not in known:
            raise RunError(f"--report-to: unknown tracker '{name}'; choose from {', '.join(known)}, "
                           "or 'all' or 'none' alone")
        if name not in installed:
            fix = f'pip install -e ".[{name}]"' if name in EXTRAS else f"pip install {name}"
            raise RunError(f"--report-to {name}: the {name} package is not installed; {fix} adds it")
    return list(dict.fromkeys(names))


@dataclass
class Settings:
    epochs: int = _opt(19, "most epochs to train; the seed asks for fewer than 20")
    target_acc: float = _opt(99.41, "stop once validation accuracy reaches this, in percent")
    batch_size: int = _opt(64, "training images per step, per process")
    global_batch_size: int = _opt(0, "if > 0: training images per step over all processes "
                                     "(per process = this / world size); overrides --batch-size")
    lr: float = _opt(0.015, "peak learning rate of the one-cycle schedule, per optimizer step")
    schedule_epochs: int = _opt(5, "epochs over which the one-cycle schedule anneals")
    tail_lr: float = _opt(0.1, "after the schedule, until the target is met or --epochs run out, each epoch "
                               "anneals again (cosine) from this fraction of --lr to zero (0: stay at the "
                               "schedule's floor, about lr/250,000)")
    dropout: float = _opt(0.0, "Dropout2d probability after each conv block (0: the layers stay, inactive)")
    rotation: float = _opt(7.0, "random rotation of training images, +- degrees (0 = none)")
    shift: float = _opt(2.0, "random shift of training images, +- pixels on each axis (0 = none)")
    ema: float = _opt(0.998, "evaluate, stop on and save an exponential moving average of the weights with this "
                             "decay per optimizer step, its BatchNorm statistics recomputed on 4,096 training "
                             "images (0 = the trained weights themselves)")
    eval_every: float = _opt(1.0, "evaluate every this fraction of an epoch, which it must divide evenly (0.5: at "
                                  "each half); the stop may come at any of these points, and training is the same")
    seed: int = _opt(1, "seed for weights, shuffling, dropout and augmentation")
    data_dir: str = _opt("data", "MNIST root; filled from the offline copy or a download if empty")
    output_dir: str = _opt("", "run folder; default: a new runs/<timestamp>")
    config: str = _opt("", "read settings from this JSON file, such as a run's config.json; flags on the "
                           "command line override it; the replay gets a new run folder unless --output-dir")
    report_to: str = _opt("tensorboard", "experiment trackers, comma-separated, written by the main process: "
                                         "any of Accelerate's (tensorboard, mlflow, wandb, ...), 'all' "
                                         "installed ones, or 'none'")
    val_split: int = _opt(0, "hold out N training images (seeded) to validate on, and test once at the end; "
                             "0 = validate on the test set, as the seed does")
    train_limit: int = _opt(0, "use only the first N training images (0 = all 60,000)")
    test_limit: int = _opt(0, "use only the first N test images (0 = all 10,000)")
    loader: str = _opt("tensor", "input path: 'tensor' (device-resident, batched augmentation) "
                                 "or 'torchvision' (the seed's DataLoader)", choices=["tensor", "torchvision"])
    workers: int = _opt(2, "DataLoader worker processes per process (torchvision loader only)")
    # 250, not 1000: on the CPU a batch of 250 keeps its activations in cache and evaluates the
    # 10,000 test images in 0.38 s instead of 0.66 s; on a GPU either is a few milliseconds.
    eval_batch_size: int = _opt(250, "test images per evaluation step, per process")
    sync_bn: bool = _opt(False, "BatchNorm statistics over all processes' batches (2+ processes); with "
                                "--global-batch-size, N processes then follow the one-process run")
    channels_last: bool = _opt(True, "NHWC memory layout for the convolutions after the first block")
    compile: bool = _opt(False, "torch.compile the network")
    cuda_graphs: bool = _opt(False, "replay each full training batch's forward and backward as CUDA graphs "
                                    "(CUDA only; off by default until measured on a GPU)")
    mixed_precision: str = _opt("", "'no', 'bf16', 'fp16' or 'fp8'; empty = take it from accelerate "
                                    "launch or its config", choices=["", "no", "bf16", "fp16", "fp8"])
    resume: str = _opt("", "continue a run: alone, from the newest checkpoint of --output-dir; with a "
                           "path, from a run folder's newest or that checkpoint folder; 'auto': from "
                           "--output-dir's newest if it has one, else start it (one command for a job that a "
                           "scheduler may restart)", nargs="?", const="latest")
    keep_checkpoints: int = _opt(2, "checkpoints kept per run (one is saved every epoch)")
    timeout: int = _opt(120, "seconds a collective of the training may wait for another rank before the job fails "
                             "(a dead or stuck process), from the end of the first epoch on")
    start_timeout: int = _opt(900, "seconds the processes may wait for each other until then: the main process "
                                   "preparing MNIST, a restarted group joining, torch.compile's first graphs")

    def check(self) -> None:
        """Raise RunError naming the first invalid value and what is allowed."""
        for ok, message in [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (0 < self.target_acc <= 100, "--target-acc is a percentage in (0, 100]"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.global_batch_size >= 0, "--global-batch-size must be 0 (off) or positive"),
            (self.lr > 0, "--lr must be positive"),
            (self.schedule_epochs >= 1, "--schedule-epochs must be at least 1"),
            (0 <= self.tail_lr <= 1, "--tail-lr is a fraction of --lr in [0, 1]"),
            (0 <= self.dropout < 1, "--dropout is a probability in [0, 1)"),
            (self.rotation >= 0, "--rotation is a non-negative number of degrees"),
            (0 <= self.shift < 14, "--shift is a number of pixels in [0, 14)"),
            (0 <= self.ema < 1, "--ema is a decay per step in [0, 1) (0: off)"),
            (0 < self.eval_every <= 1 and abs(1 / self.eval_every - round(1 / self.eval_every)) < 0.01,
             "--eval-every is a fraction of an epoch that divides it evenly: 1, 0.5, 0.25, 0.2, ..."),
            (self.val_split >= 0, "--val-split must be 0 (off) or a number of images"),
            (self.train_limit >= 0 and self.test_limit >= 0, "--train-limit/--test-limit must be 0 (all) or positive"),
            (self.workers >= 0, "--workers must be 0 or more"),
            (self.eval_batch_size >= 1, "--eval-batch-size must be at least 1"),
            (self.timeout >= 1 and self.start_timeout >= 1, "--timeout/--start-timeout must be at least 1 second"),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be at least 1"),
            (not (self.cuda_graphs and self.compile), "--cuda-graphs and --compile each replace the eager step; "
                                                      "choose one"),
            (not (self.cuda_graphs and self.loader == "torchvision"), "--cuda-graphs needs --loader tensor"),
            (self.output_dir or self.resume not in ("latest", "auto"),
             f"--resume {'auto' if self.resume == 'auto' else 'without a path'} needs --output-dir: the run folder to "
             "continue" + (" (or give it as --resume RUN_FOLDER)" if self.resume == "latest" else "")),
        ]:
            if not ok:
                raise RunError(message)
        trackers(self.report_to)


def check_precision(precision: str) -> None:
    """Refuse, before Accelerate is set up, a precision that would not apply to this network anywhere."""
    if precision == "fp8":
        raise RunError("fp8 mixed precision would train this network in fp32: Accelerate converts only Linear and "
                       "LayerNorm layers to fp8, and it has only Conv2d and BatchNorm. Use --mixed-precision bf16 "
                       "(or fp16 on a GPU) or no.")


def resolve(s: Settings, world: int, device: str, precision: str) -> Settings:
    """The settings as this run trains them on `world` processes of `device` in `precision`: --global-batch-size
    turned into the per-process batch, and the refusal of what cannot run there."""
    if s.cuda_graphs and (device != "cuda" or (s.sync_bn and world > 1)):
        raise RunError(f"--cuda-graphs needs a CUDA device and no --sync-bn across processes; this run has {device}"
                       + (" and --sync-bn" if s.sync_bn and world > 1 else "") + ".")
    if s.global_batch_size:
        if s.global_batch_size % world:
            raise RunError(f"--global-batch-size {s.global_batch_size} does not divide over {world} processes.")
        s = dataclasses.replace(s, batch_size=s.global_batch_size // world)
    return s


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist_dist.train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train the seed's 9,720-parameter CNN on MNIST until validation accuracy reaches the "
                    "target. Launch with 'accelerate launch -m mnist_dist.train'.")
    for f in dataclasses.fields(Settings):
        # Both spellings: --target-acc as here, --target_acc as accelerate's own flags.
        flags = dict.fromkeys(["--" + f.name.replace("_", "-"), "--" + f.name])
        kw = dict(default=f.default, help=f.metadata["help"], dest=f.name)
        if f.type is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        else:
            extra = {k: v for k, v in f.metadata.items() if k in ("choices", "nargs", "const")}
            parser.add_argument(*flags, type=f.type, **extra, **kw)
    return parser


# Keys of a run's config.json that say where and how that run went, not what to train. output_dir,
# resume and config are settings, but replaying them would continue or overwrite the old run.
NOT_REPLAYED = ("world_size", "global_batch", "distributed_type", "device", "versions", "threads",
                "output_dir", "resume", "config")


def read_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """The settings in a JSON file such as a run's config.json; argparse's error for a bad file, key or value."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        parser.error(f"--config {path}: {err}")
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a JSON object of settings")
    skipped = [k for k in NOT_REPLAYED if k in data]
    if skipped and os.environ.get("RANK", "0") == "0":  # every process parses; one says it
        print(f"mnist_dist: note: --config ignores {', '.join(skipped)}: they describe the old run, "
              "not what to train", file=sys.stderr)
    fields, values = {f.name: f for f in dataclasses.fields(Settings)}, {}
    for key, value in ((k, v) for k, v in data.items() if k not in NOT_REPLAYED):
        if key not in fields:
            parser.error(f"--config {path}: '{key}' is not a setting")
        f = fields[key]
        # Exact JSON types: argparse would convert a string default ("5") and skip choices for
        # defaults, and bool is an int to isinstance. A whole number may stand for a float.
        ok = type(value) is f.type or (f.type is float and type(value) is int)
        if not ok or value not in f.metadata.get("choices", [value]):
            allowed = f.metadata.get("choices") or f.type.__name__
            parser.error(f"--config {path}: '{key}' is {json.dumps(value)}; expected {allowed}")
        values[key] = f.type(value)
    return values


def parse_args(argv: list[str] | None = None) -> Settings:
    """Settings from the command line over those of --config; invalid values exit with argparse's usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        # The file's values become the defaults, so that flags given on the command line win.
        parser.set_defaults(**read_config(args.config, parser))
        args = parser.parse_args(argv)
    settings = Settings(**vars(args))
    try:
        settings.check()
    except RunError as err:
        parser.error(str(err))
    return settings
