"""The experiment trackers: each one's set-up inside the run folder, `log`, and the report at the end.

Accelerate runs the trackers on the main process only. Every tracker logs at the global optimizer step, and a
resumed run continues the same TensorBoard folder and W&B run, each step once.
"""
import hashlib
import os
from pathlib import Path

from accelerate import Accelerator
from accelerate.tracking import WandBTracker


def hparams(info: dict) -> dict:
    """The settings as trackers take them: plain values only."""
    return {k: v for k, v in info.items() if isinstance(v, (bool, int, float, str))}


def inside(log_with: list[str], out: Path) -> list:
    """`log_with` for Accelerator(...), each tracker writing into the run folder `out`."""
    log_with = list(log_with)
    if "mlflow" in log_with:  # Accelerate gives MLflow no folder: its store goes into the run folder
        os.environ.setdefault("MLFLOW_TRACKING_URI", (out / "mlruns").resolve().as_uri())
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this consent
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "mnist_dist")
    if "wandb" in log_with:  # made here: Accelerate would name W&B's project after TensorBoard's folder
        os.environ.setdefault("WANDB_DIR", str(out.resolve()))  # offline files (WANDB_MODE=offline) in the run folder
        # The id, from the folder's path, is the same when the run resumes: one W&B run, continued (resume="allow").
        run_id = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]
        log_with[log_with.index("wandb")] = WandBTracker("mnist_dist", name=out.name, id=run_id, resume="allow")
    return log_with


class Trackers:
    """The run's trackers. A write that fails is kept as `error`, which the loop's next poll turns into a stop
    of every rank: raised here, on the main process alone, it would leave the others waiting in a collective."""

    def __init__(self, accelerator: Accelerator, out: Path):
        self.accelerator, self.out, self.error = accelerator, out, ""

    def tensorboard(self):
        """TensorBoard's SummaryWriter on the main process of a run that logs to it, else None."""
        if not (self.accelerator.is_main_process and any(t.name == "tensorboard" for t in self.accelerator.trackers)):
            return None
        return self.accelerator.get_tracker("tensorboard", unwrap=True)

    def others(self) -> list:
        return [t for t in self.accelerator.trackers if t.name != "tensorboard"] if self.accelerator.is_main_process else []

    def start(self, info: dict, summary: str, step: int) -> None:
        """Open the trackers once the resume point, `step`, is known."""
        # purge_step: TensorBoard drops what a killed run logged after its checkpoint; this run logs those steps anew.
        # "tensorboard" names TensorBoard's folder in the run; MLflow's experiment is named in `inside`.
        self.accelerator.init_trackers("tensorboard", init_kwargs={"tensorboard": {"purge_step": step + 1},
                                                                   "mlflow": {"run_name": self.out.name}})
        for tracker in self.others():  # TensorBoard gets the settings at the end, with the results
            tracker.store_init_configuration(hparams(info))
            if tracker.name == "wandb":  # W&B can draw the per-epoch scalars against the epoch
                tracker.tracker.define_metric("epoch")
                for key in ("train/*", "val/*", "lr", "seconds_per_epoch"):
                    tracker.tracker.define_metric(key, step_metric="epoch")
        tb = self.tensorboard()
        if tb and not step:
            tb.add_text("model/summary", "    " + summary.replace("\n", "\n    "), 0)  # a markdown code block

    def log(self, values: dict, step: int) -> None:
        """accelerator.log, with any failure kept for the next poll: a full disk, or a tracker that lost its server."""
        try:
            self.accelerator.log(values, step=step)
        except OSError as err:
            self.error = self.error or f"cannot write the trackers' logs in '{self.out}' ({err.strerror})"
        except Exception as err:
            self.error = self.error or f"a tracker failed ({type(err).__name__}: {' '.join(str(err).split())[:200]})"

    def log_epoch(self, row: dict, lr: float, step: int) -> None:
        """An epoch's row of the history, at its last optimizer step: W&B drops a step lower than the last one."""
        self.log({"epoch": row["epoch"], "train/loss": row["train_loss"], "train/acc": row["train_acc"],
                  "val/loss": row["val_loss"], "val/acc": row["val_acc"], "lr": lr,
                  "seconds_per_epoch": row["seconds"]}, step)

    def report(self, info: dict, metrics: dict, figures, step: int) -> None:
        """The final metrics at the last optimizer `step` (main process); TensorBoard also gets the settings as
        hparams with them, and the pictures of `figures()` (name -> matplotlib figure), drawn only for it."""
        results = {f"hparam/{k}": float(metrics[k]) for k in ("final_val_acc", "stop_epoch", "wall_seconds",
                                                               "reached_target")}
        for tracker in self.others():
            tracker.log(results, step=step)
        tb = self.tensorboard()
        if tb is None:
            return
        for name, figure in figures().items():
            tb.add_figure(name, figure, step)
        tb.add_hparams(hparams(info), results)
