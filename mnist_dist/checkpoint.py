"""Checkpoints: Accelerate's `save_state`, made durable and verified, ordered by when they were saved.

`RUN/checkpoints/epoch_0003`, or `epoch_0003_step_00042` when a signal stopped the run 42 steps into
epoch 4, is written as `.partial-...` and published by a rename, so that a kill or a full disk during a save
leaves the previous one intact. The loop's `Progress` is registered with Accelerate and saved with the
model, the average of its weights (--ema, Accelerate's second model), optimizer, schedule, sampler and
per-rank RNG states (as `custom_checkpoint_0.pkl`).

- **Durable.** A rename orders nothing against the files' data: after a power loss the renamed folder could
  hold empty or cut-short files. So every rank flushes (fsync) the files it wrote before the ranks agree the
  save is done; the main process then flushes every file of the folder (those of other ranks too, where it
  sees them), writes `manifest.json` last and flushes it and the folder, renames the folder into place and
  flushes `checkpoints/`.
- **Verified.** The manifest lists each file's size and sha256, and the save counter. A checkpoint without a
  readable manifest, or whose files do not match it, is *torn*: it is never continued. One saved before
  checkpoints had manifests counts as torn too (it is not known to be complete); `python -m
  mnist_dist.manifest seal FOLDER` checks what can be checked of one (every torch file's CRCs, every
  safetensors file's header and length) and records its manifest.
- **Fall back.** A continuation (`--resume auto`, `--resume` of a run folder, a torchrun restart, a SLURM
  requeue) whose newest checkpoint is torn continues the newest intact one instead, says so in one line and
  sets the torn one aside as `torn-NAME` (renamed, never deleted). A torn checkpoint named explicitly is an
  error that names the intact one to resume instead.
- **Newest is saved last.** Checkpoints are ordered by the manifest's save counter, not by name. A run that
  resumes an older checkpoint starts a branch: at its first save, the checkpoints saved after the one it
  continues (the abandoned branch) are set aside as `abandoned-NAME`, so no later continuation picks them,
  and retention keeps the branch's last `keep` saves, its parent included while it is among them.
"""
import dataclasses
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list

from mnist_dist import job
from mnist_dist.distributed import agree, together
from mnist_dist.errors import RunError
from mnist_dist.manifest import MANIFEST, NO_MANIFEST, PROGRESS, manifest, next_save, record, verify
from mnist_dist.rundir import flush_file, flush_folder

CHECKPOINTS = "checkpoints/epoch_*"  # what newest, retention and resume look at; set-aside ones are torn-*, abandoned-*
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
    seconds: float = 0.0  # the run's wall seconds up to this checkpoint, over all its processes so far

    def step(self, steps: int) -> int:
        """Optimizer steps taken so far, at `steps` per epoch."""
        return self.epoch * steps + self.batches_done

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


# The main process's memory of the branch it trains: the save counter of the checkpoint the run continues (the
# one it resumed, then each one it saved), 0 for a run that started anew. Set by resume_point, load and save.
_parent = 0
_pending: list = []  # (torn checkpoint, why): what the continuation resume_point chose sets aside once it loads
_announced: set = set()  # torn checkpoints already named in a line: the first save sets them aside silently


def survey(run_dir: Path) -> list[tuple[Path, dict | None, str | None]]:
    """The run's checkpoints, saved last first, each with its manifest and why it is torn (None: intact). Those
    whose save cannot be told (no readable manifest) come first: nothing shows they are older."""
    found = [(f, manifest(f), verify(f)) for f in run_dir.glob(CHECKPOINTS) if f.is_dir()]
    return sorted(found, key=lambda x: (x[1] is None, x[1]["save"] if x[1] else 0, x[0].name), reverse=True)


def _choose(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The checkpoint saved last that is intact, and the torn ones that may be newer (which a continuation sets
    aside)."""
    torn = []
    for folder, _, why in survey(run_dir):
        if why is None:
            return folder, torn
        torn.append((folder, why))
    return None, torn


def newest(run_dir: Path) -> Path | None:
    """The checkpoint saved last that is intact: the one to continue."""
    return _choose(run_dir)[0]


# Saving.

def save(accelerator: Accelerator, run_dir: Path, progress: Progress, keep: int) -> Path:
    """Save the full training state, durably, with its manifest; keep the branch's last `keep` saves.
    Every rank must call it."""
    global _parent
    name = f"epoch_{progress.epoch:04d}" + (f"_step_{progress.batches_done:05d}" if progress.batches_done else "")
    folder, partial = run_dir / "checkpoints" / name, run_dir / "checkpoints" / f".partial-{name}"
    state = PartialState()
    together(_clear_partials, run_dir, main_only=True)  # a save killed earlier leaves one
    error = None
    try:
        accelerator.save_state(str(partial))  # each rank writes its RNG state, the main one the rest
        if not state.is_main_process:
            # Every other rank flushes what it wrote before the ranks agree that the save is done: on several
            # machines the main process cannot flush another machine's writes. The main one flushes all it sees next.
            flush_file(partial / f"random_states_{state.process_index}.pkl")
            flush_folder(partial)
    except Exception as err:  # OSError, or torch's RuntimeError from its zip writer on a full disk
        error = _failure(err, run_dir)
    error = agree(error)  # past it, every rank's files are written and flushed
    if error:
        together(_clear_partials, run_dir, main_only=True)
        raise RunError(_cannot_write(folder, error, run_dir))
    saved = together(_publish, run_dir, partial, folder, keep, progress, main_only=True)
    if state.is_main_process:
        _parent = saved
    return folder


def _failure(err: Exception, run_dir: Path) -> str:
    free = shutil.disk_usage(run_dir).free // 1024
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0]}; {free:,} KiB left on that disk"


def _cannot_write(folder: Path, error: str, run_dir: Path) -> str:
    last = newest(run_dir)
    return (f"cannot write the checkpoint '{folder}' ({error}). "
            + (f"The last complete checkpoint is '{last}': once there is room, continue with --resume {last}."
               if last else "No earlier checkpoint exists."))


def _clear_partials(run_dir: Path) -> None:
    for old in run_dir.glob("checkpoints/.partial-*"):
        shutil.rmtree(old)


def _publish(run_dir: Path, partial: Path, folder: Path, keep: int, progress: Progress) -> int:
    """Seal the complete save, set aside what the branch does not continue, publish it, apply retention (main
    process). Returns its save counter."""
    checkpoints, number = folder.parent, next_save(run_dir, _parent)
    saved = {"save": number, "parent": _parent or None, "name": folder.name, "epoch": progress.epoch,
              "batches_done": progress.batches_done, "world_size": PartialState().num_processes}
    try:
        record(partial, saved, published=False)
    except OSError as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise RunError(_cannot_write(folder, _failure(err, run_dir), run_dir)) from None
    branch, moved = [], []
    for other, m, why in survey(run_dir):
        if why or m["save"] > _parent:  # torn, or saved after the checkpoint this run continues: another branch
            moved.append((other, _set_aside(other, "torn" if why else "abandoned"), why))
        elif other.name == folder.name:  # an older save of this branch at the same point: replaced
            shutil.rmtree(other)
        else:
            branch.append(other)  # saved last first
    if moved:
        flush_folder(checkpoints)  # set aside before the new one appears
    partial.rename(folder)
    flush_folder(checkpoints)
    for old in branch[max(keep - 1, 0):]:
        shutil.rmtree(old)
    said = [f"'{o}' ({f'torn: {why}' if why else 'saved after the checkpoint this run continues: a branch it left'}) "
            f"as '{new}'" for o, new, why in moved if str(o) not in _announced]
    if said:
        print(f"mnist_dist: set aside {'; '.join(said)}", file=sys.stderr, flush=True)
    return number


def _set_aside(folder: Path, kind: str) -> Path:
    """Rename `folder` out of what newest, retention and resume look at; never deleted."""
    new, n = folder.with_name(f"{kind}-{folder.name}"), 1
    while new.exists():
        n += 1
        new = folder.with_name(f"{kind}-{folder.name}-{n}")
    folder.rename(new)
    return new


# Resuming.

def _run_of(folder: Path) -> Path | None:
    return folder.parent.parent if folder.parent.name == "checkpoints" else None


def _more(torn: list) -> str:
    return f"; {len(torn) - 1} more torn" if len(torn) > 1 else ""


def _sealing(why: str, folder: Path) -> str:
    return (f" If you know it is complete, `python -m mnist_dist.manifest seal {folder}` records its manifest; the "
            "same command then resumes it." if why == NO_MANIFEST else "")


def _torn_named(folder: Path, why: str) -> str:
    run = _run_of(folder)
    instead = newest(run) if run else None
    return (f"the checkpoint '{folder}' is torn ({why}), so it cannot be resumed. "
            + (f"The newest intact checkpoint of its run is '{instead}': continue with the same command, "
               f"--resume {instead} in place of --resume {folder}." if instead else
               "No intact checkpoint is left in its run: start anew, with the same command without --resume "
               "(and another --output-dir if it names this run's folder).") + _sealing(why, folder))


def _none_intact(run_dir: Path, torn: list, given: str) -> str:
    if not torn:
        return (f"--resume found no checkpoint in '{run_dir}/checkpoints'; pass the run folder "
                "(--resume RUN_FOLDER, or --output-dir RUN_FOLDER --resume) or a checkpoint folder.")
    (first, why), more = torn[0], _more(torn)
    return (f"--resume found no intact checkpoint in '{run_dir}/checkpoints': '{first}' is torn ({why}{more}). "
            f"To start the run anew in that folder, use the same command with --resume auto --output-dir {run_dir} "
            f"in place of {given} (the torn checkpoints are set aside, not deleted)." + _sealing(why, first))


def find(resume: str, run_dir: Path, trajectory: dict) -> Path:
    """The checkpoint folder `--resume` means (the newest intact one of `run_dir` for 'latest', of a run folder,
    or a checkpoint folder), refused if it is torn, if this rank cannot read it or if another trajectory wrote
    it. Reads only: nothing is written before the resume is known sound."""
    given = "--resume" + ("" if resume == "latest" else f" {resume}")
    if resume != "latest" and (Path(resume) / "checkpoints").is_dir():  # a run folder
        run_dir, resume = Path(resume), "latest"
    if resume == "latest":
        folder, torn = _choose(run_dir)
        if folder is None:
            raise RunError(_none_intact(run_dir, torn, given))
    else:
        folder = Path(resume)
        if not (folder / PROGRESS).is_file() and not (folder / MANIFEST).is_file():
            raise RunError(f"'{folder}' is neither an mnist_dist run folder nor one of its checkpoints "
                           f"RUN/checkpoints/epoch_NNNN (no {PROGRESS}).")
        if why := verify(folder):
            raise RunError(_torn_named(folder, why))
    try:
        saved = torch.load(folder / PROGRESS, weights_only=True)["trajectory"]
        changed = [f"{k.replace('_', '-')} (saved {saved.get(k)!r}, given {v!r})"
                   for k, v in trajectory.items() if saved.get(k) != v]
    except Exception as err:  # unreadable, not ours
        raise RunError(f"cannot read the checkpoint '{folder}' ({type(err).__name__}: {err}).") from None
    if changed:
        raise RunError(f"cannot resume '{folder}' with other settings: {', '.join(changed)}. Use the run's "
                       "settings (world-size is the number of processes), or start a new run.")
    rank = PartialState().process_index
    if not (folder / f"random_states_{rank}.pkl").is_file():
        raise RunError(f"cannot resume '{folder}': process {rank} finds no random_states_{rank}.pkl there.")
    return folder


def _plan(resume: str, out: Path, auto: bool) -> tuple[str, list, str]:
    """The main process's choice: (checkpoint to continue or '', the torn ones it sets aside, a line to say)."""
    if auto:
        folder, torn = _choose(out)
        if folder is None:
            if not torn:
                return "", [], ""
            (first, why), more = torn[0], _more(torn)
            return "", [], (f"mnist_dist: no intact checkpoint to continue in '{out / 'checkpoints'}': '{first}' is "
                            f"torn ({why}{more}); starting the run anew, and its first checkpoint sets the torn "
                            "one(s) aside as torn-*")
        return str(folder), torn, ""
    a_run = resume != "latest" and (Path(resume) / "checkpoints").is_dir()
    if resume != "latest" and not a_run:  # a checkpoint folder, named: find verifies it, with no fallback
        return resume, [], ""
    folder, torn = _choose(Path(resume) if a_run else out)
    if folder is None:
        raise RunError(_none_intact(Path(resume) if a_run else out, torn,
                                    f"--resume {resume}" if a_run else "--resume"))
    return str(folder), torn, ""


def resume_point(resume: str, out: Path, trajectory: dict) -> Path | None:
    """The checkpoint to continue: --resume's; or with --resume auto, or in a job a scheduler restarted, the
    run folder's newest intact one if it has one (else the run starts). A continuation whose newest checkpoint
    is torn continues the newest intact one, which `load` says in one line. The main process chooses, so that
    every rank agrees even where only the main process sees the run folder; every rank then checks the choice.
    Every rank must call it. Reads only: the run folder is not yet the job's."""
    global _parent, _pending
    _parent, _pending = 0, []
    auto = resume == "auto" or job.restarted()
    if not (auto or resume):
        return None
    plan = together(_plan, resume, out, auto, main_only=True)
    where, torn, line = broadcast_object_list([plan])[0]
    if line and PartialState().is_main_process:
        print(line, file=sys.stderr, flush=True)
        _announced.update(str(p) for p in out.glob(CHECKPOINTS))
    if not where:
        return None
    folder = together(find, where, out, trajectory)
    _pending = torn
    return folder


def load(accelerator: Accelerator, folder: Path) -> None:
    """Restore the training state saved in `folder`, the registered Progress included, once the main process has
    verified it against its manifest. The torn checkpoints saved after it that resume_point passed over are set
    aside first, in one line. Accelerate's loaders read the weights from safetensors and the rest with
    torch.load(weights_only=True). Every rank must call it."""
    global _parent
    _parent = together(_ready, Path(folder), main_only=True) or 0
    try:
        accelerator.load_state(str(folder))
    except Exception as err:
        raise RunError(f"cannot load the checkpoint '{folder}' ({type(err).__name__}: {err}).") from None


def _ready(folder: Path) -> int:
    """Verify `folder`, set aside the torn checkpoints passed over for it (main process); its save counter."""
    global _pending
    if why := verify(folder):
        raise RunError(f"cannot load the checkpoint '{folder}': it is torn ({why}).")
    torn, _pending = _pending, []
    torn = [(t, why) for t, why in torn if t.exists()]  # one gone meanwhile has nothing to set aside
    if torn:
        moved = [_set_aside(t, "torn") for t, _ in torn]
        flush_folder(folder.parent)
        (first, why), more = torn[0], len(torn) - 1
        print(f"mnist_dist: checkpoint '{first}' is torn ({why}); continuing from '{folder}' instead; '{first}' moved "
              f"to '{moved[0]}'" + (f" ({more} more torn, also set aside as torn-*)" if more else ""),
              file=sys.stderr, flush=True)
    return manifest(folder)["save"]
