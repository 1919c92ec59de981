"""Checkpoints: Accelerate's `save_state`, made atomic, with the loop's progress inside.

`RUN/checkpoints/epoch_0003`, or `epoch_0003_step_00042` when a signal stopped the run 42 steps into
epoch 4, is written as `.partial-...` and renamed once complete: a kill or a full disk during a save
leaves the previous one intact. The loop's `Progress` is registered with Accelerate and saved with the
model, the average of its weights (--ema, Accelerate's second model), optimizer, schedule, sampler and
per-rank RNG states (as `custom_checkpoint_0.pkl`).
"""
import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState

from mnist_dist.distributed import agree, together
from mnist_dist.settings import RunError

PROGRESS = "custom_checkpoint_0.pkl"  # where Accelerate saves the first registered object
# Settings that fix the training trajectory, or what it is judged by (--ema): a resume with other values would
# silently continue another run, so it is refused. --epochs and --target-acc may change.
TRAJECTORY = ("batch_size", "world_size", "lr", "schedule_epochs", "tail_lr", "dropout", "rotation", "shift",
              "ema", "seed", "train_limit", "test_limit", "val_split", "loader", "workers", "sync_bn",
              "channels_last", "mixed_precision")


@dataclass
class Progress:
    """Where the loop stands, saved in every checkpoint. The same on every rank."""
    epoch: int = 0  # epochs completed
    batches_done: int = 0  # steps taken into the next epoch (a checkpoint made mid-epoch)
    carried: list = field(default_factory=lambda: [0.0, 0.0, 0.0])  # that part's loss x images, correct, images: all ranks
    history: list = field(default_factory=list)  # one row per completed epoch
    trajectory: dict = field(default_factory=dict)  # TRAJECTORY's values for this run

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


def newest(run_dir: Path) -> Path | None:
    found = sorted(run_dir.glob("checkpoints/epoch_*"))
    return found[-1] if found else None


def save(accelerator: Accelerator, run_dir: Path, progress: Progress, keep: int) -> Path:
    """Save the full training state; keep the newest `keep` checkpoints. Every rank must call it."""
    name = f"epoch_{progress.epoch:04d}" + (f"_step_{progress.batches_done:05d}" if progress.batches_done else "")
    folder, partial = run_dir / "checkpoints" / name, run_dir / "checkpoints" / f".partial-{name}"
    last = newest(run_dir)
    together(_clear_partials, run_dir, main_only=True)  # a save killed earlier leaves one
    error = None
    try:
        accelerator.save_state(str(partial))  # each rank writes its RNG state, the main one the rest
    except Exception as err:  # OSError, or torch's RuntimeError from its zip writer on a full disk
        free = shutil.disk_usage(run_dir).free // 1024
        error = f"{type(err).__name__}: {str(err).strip().splitlines()[0]}; {free:,} KiB left on that disk"
    error = agree(error)
    if error:
        together(_clear_partials, run_dir, main_only=True)
        raise RunError(f"cannot write the checkpoint '{folder}' ({error}). "
                       + (f"The last complete checkpoint is '{last}': once there is room, continue with "
                          f"--resume {last}." if last else "No earlier checkpoint exists."))
    together(_publish, partial, folder, keep, main_only=True)
    return folder


def _clear_partials(run_dir: Path) -> None:
    for old in run_dir.glob("checkpoints/.partial-*"):
        shutil.rmtree(old)


def _publish(partial: Path, folder: Path, keep: int) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    for old in sorted(folder.parent.glob("epoch_*"))[:-keep]:
        shutil.rmtree(old)


def find(resume: str, run_dir: Path, trajectory: dict) -> Path:
    """The checkpoint folder `--resume` means (the newest of `run_dir` for 'latest', of a run folder, or a
    checkpoint folder), refused if this rank cannot read it or another trajectory wrote it. Reads only:
    nothing is written before the resume is known sound."""
    if resume != "latest" and (Path(resume) / "checkpoints").is_dir():  # a run folder
        run_dir, resume = Path(resume), "latest"
    folder = newest(run_dir) if resume == "latest" else Path(resume)
    if folder is None:
        raise RunError(f"--resume found no checkpoint in '{run_dir}/checkpoints'; pass the run folder "
                       "(--resume RUN_FOLDER, or --output-dir RUN_FOLDER --resume) or a checkpoint folder.")
    if not (folder / PROGRESS).is_file():
        raise RunError(f"'{folder}' is neither an mnist_dist run folder nor one of its checkpoints "
                       f"RUN/checkpoints/epoch_NNNN (no {PROGRESS}).")
    try:
        saved = torch.load(folder / PROGRESS, weights_only=True)["trajectory"]
        changed = [f"{k.replace('_', '-')} (saved {saved.get(k)!r}, given {v!r})"
                   for k, v in trajectory.items() if saved.get(k) != v]
    except Exception as err:  # unreadable, truncated, not ours
        raise RunError(f"cannot read the checkpoint '{folder}' ({type(err).__name__}: {err}).") from None
    if changed:
        raise RunError(f"cannot resume '{folder}' with other settings: {', '.join(changed)}. Use the run's "
                       "settings (world-size is the number of processes), or start a new run.")
    rank = PartialState().process_index
    if not (folder / f"random_states_{rank}.pkl").is_file():
        raise RunError(f"cannot resume '{folder}': process {rank} finds no random_states_{rank}.pkl there.")
    return folder


def load(accelerator: Accelerator, folder: Path) -> None:
    """Restore the training state saved in `folder`, the registered Progress included. Accelerate's loaders
    read the weights from safetensors and the rest with torch.load(weights_only=True)."""
    try:
        accelerator.load_state(str(folder))
    except Exception as err:
        raise RunError(f"cannot load the checkpoint '{folder}' ({type(err).__name__}: {err}).") from None
