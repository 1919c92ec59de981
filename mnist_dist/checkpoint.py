"""Checkpoints: Accelerate's `save_state` made atomic, plus the loop's own progress.

A checkpoint is `RUN/checkpoints/epoch_0003` (or `epoch_0003_step_0042` when a
signal stopped the run mid-epoch). It is first written as `.partial-...` and
renamed once complete, so a kill during a save leaves the previous one intact.
Model, optimizer, scheduler, sampler and RNG states are Accelerate's files;
`progress.json` holds the epoch, the step and the metrics history.
"""
import json
import shutil
from pathlib import Path

from accelerate import Accelerator

from mnist_dist.settings import RunError

MARK = "mnist_dist checkpoint"


def save(accelerator: Accelerator, run_dir: Path, progress: dict, keep: int) -> Path:
    """Save the full training state; keep the newest `keep` checkpoints. Every rank must call it."""
    name = f"epoch_{progress['epoch']:04d}" + (f"_step_{progress['batches_done']:05d}" if progress["batches_done"] else "")
    folder, partial = run_dir / "checkpoints" / name, run_dir / "checkpoints" / f".partial-{name}"
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()  # all ranks' files are written
    if accelerator.is_main_process:
        (partial / "progress.json").write_text(json.dumps({"format": MARK, **progress}))
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
        for old in sorted(run_dir.glob("checkpoints/epoch_*"))[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return folder


def find(resume: str, run_dir: Path) -> Path:
    """The checkpoint folder `--resume` means: 'latest' in `run_dir`, or a given path."""
    if resume == "latest":
        found = sorted(run_dir.glob("checkpoints/epoch_*"))
        if not found:
            raise RunError(f"--resume found no checkpoint in '{run_dir}/checkpoints'; pass the run folder "
                           "with --output-dir, or a checkpoint folder with --resume PATH.")
        return found[-1]
    folder = Path(resume)
    try:
        ok = json.loads((folder / "progress.json").read_text()).get("format") == MARK
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise RunError(f"'{folder}' is not an mnist_dist checkpoint (no valid progress.json); checkpoints are "
                       "the folders RUN/checkpoints/epoch_NNNN.")
    return folder


def load(accelerator: Accelerator, folder: Path) -> dict:
    """Restore the training state saved in `folder`; return its progress (epoch, step, history)."""
    try:
        # Accelerate's own loaders: weights from safetensors, other state via torch.load(weights_only=True)
        accelerator.load_state(str(folder))
    except Exception as err:
        raise RunError(f"cannot load the checkpoint '{folder}' ({type(err).__name__}: {err}); "
                       "was it saved with other settings?") from None
    return json.loads((folder / "progress.json").read_text())
