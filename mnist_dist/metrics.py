"""What training, `mnist_dist.evaluate` and the final report share: one evaluation routine, its Score, the stop rule."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator


def reached(correct: int, total: int, target_acc: float) -> bool:
    """Whether `correct` of `total` is at least `target_acc` percent (9,941/10,000 >= 99.41)."""
    return 100 * correct / total >= target_acc


def met(history: list[dict], step: int, steps: int, target_acc: float) -> bool:
    """Whether the last evaluation of `history` reached the target, with no step taken since it (a resumed run that
    did trains no further). `step`: optimizer steps so far; `steps`: per epoch (a row saved before rows had a
    step was made at its epoch's end)."""
    if not history:
        return False
    last = history[-1]
    return last.get("step", last["epoch"] * steps) == step and reached(last["val_correct"], last["val_total"],
                                                                      target_acc)


def evaluation_points(steps: int, every: float) -> dict[int, float]:
    """The steps into an epoch of `steps` at which --eval-every evaluates before its end, each with the fraction
    of the epoch it stands for (the row's epoch: 3.5, not 3.4989 for step 234 of 469)."""
    n = round(1 / every)
    points = {round(j * steps / n): j / n for j in range(1, n)}
    return {done: part for done, part in points.items() if 0 < done < steps}


def epoch_label(epoch: int, part: float) -> int | float:
    """A row's epoch: a whole number at an epoch's end, else the fraction reached (3.5)."""
    return epoch + 1 if part == 1 else round(epoch + part, 4)


@dataclass
class Score:
    """One pass over a loader: mean loss, counts, and every image's prediction and label in loader order."""
    loss: float
    correct: int
    total: int
    pred: torch.Tensor
    true: torch.Tensor

    def confusion(self) -> torch.Tensor:  # 10x10 counts, rows: true digit, columns: predicted
        return torch.bincount(self.true * 10 + self.pred, minlength=100).view(10, 10)


@torch.inference_mode()
def score(model, loader, accelerator: Accelerator) -> Score:
    """Evaluate over the whole loader; the same Score on every rank, every image counted once. The one
    evaluation routine: training's validation, the final test, this tool. `gather_for_metrics`, called
    per batch, drops the images that the sharded loader repeated to even out the ranks. Everything stays
    on the device until one copy at the end: a GPU's host waits once per evaluation, not per batch."""
    model.eval()
    # float64: the same sum as Python's float adding up each batch's float32 sum.
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    preds, trues = [], []
    for x, y in loader:
        logits = model(x)
        losses, pred, true = accelerator.gather_for_metrics(
            (F.cross_entropy(logits.float(), y, reduction="none"), logits.argmax(1), y))
        loss_sum += losses.sum()
        preds.append(pred)
        trues.append(true)
    # One copy: the loss sum travels with the labels as float64, which holds digits exactly.
    out = torch.cat([loss_sum.view(1), *preds, *trues]).cpu()
    n = (len(out) - 1) // 2
    pred, true = out[1:n + 1].long(), out[n + 1:].long()
    return Score(float(out[0]) / n, int((pred == true).sum()), n, pred, true)


def epoch_line(row: dict, epochs: int) -> str:
    """An epoch of the history as the log prints it."""
    return (f"epoch {row['epoch']:>2}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:6.2f}%  "
            f"val loss {row['val_loss']:.4f} acc {row['val_acc']:6.2f}% ({row['val_correct']}/{row['val_total']})  "
            f"{row['seconds']:.1f} s")


def final_line(metrics: dict, out) -> str:
    """The log's last line: whether the run reached its target, where, and how fast."""
    return (f"{'reached' if metrics['reached_target'] else 'did not reach'} {metrics['target_acc']}%: epoch "
            f"{metrics['stop_epoch']}, val acc {metrics['final_val_acc']:.2f}%"
            + (f", test acc {metrics['test_acc']:.2f}%" if "test_acc" in metrics else "")
            + f", {metrics['wall_seconds']:.1f} s, run folder {out}")


def run_metrics(s, history: list[dict], params: int, world: int, precision: str, bn_images: int,
                test: Score | None) -> dict:
    """What metrics.json records of a run with settings `s` (docs/run_folder.md lists the fields)."""
    row = history[-1]
    metrics = {"params": params, "target_acc": s.target_acc,
               "reached_target": reached(row["val_correct"], row["val_total"], s.target_acc),
               "stop_epoch": row["epoch"], "world_size": world, "mixed_precision": precision,
               "wall_seconds": row["elapsed"], "final_val_acc": row["val_acc"],
               "validation": f"{s.val_split} held-out training images" if s.val_split else "test set",
               "weights": (f"exponential moving average, decay {s.ema} per step, BatchNorm statistics recomputed on "
                           f"{bn_images} training images") if s.ema else "trained",
               "epochs": history}
    if test is not None:
        metrics["test_acc"] = 100 * test.correct / test.total
    return metrics
