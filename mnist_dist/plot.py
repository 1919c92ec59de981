"""The seed's final graph: accuracy and loss against epochs, train and test.

    python -m mnist_dist.plot RUN_DIR [RUN_DIR ...] [-o curves.png]

redraws it from each run's metrics.json; several runs are overlaid.
"""
import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: CI and clusters have no display
import matplotlib.colors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402


def curves_figure(runs: dict[str, dict]) -> plt.Figure:
    """Accuracy and loss per epoch, training and validation, for each named metrics dict, with the target and
    each stop marked."""
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for i, (name, m) in enumerate(runs.items()):
        ep = [e["epoch"] for e in m["epochs"]]
        color = f"C{i}"
        label = f"{name} " if len(runs) > 1 else ""
        for ax, key in ((acc_ax, "acc"), (loss_ax, "loss")):
            ax.plot(ep, [e[f"train_{key}"] for e in m["epochs"]], "--", color=color, label=f"{label}train")
            val_name = "test" if m.get("validation", "test set") == "test set" else "validation"
            ax.plot(ep, [e[f"val_{key}"] for e in m["epochs"]], "-o", ms=3, color=color, label=f"{label}{val_name}")
        if m.get("reached_target"):
            for ax in (acc_ax, loss_ax):
                ax.axvline(m["stop_epoch"], color=color, ls=":", lw=1)
            acc_ax.annotate(f"stop: epoch {m['stop_epoch']}, {m['final_val_acc']:.2f}%",
                            (m["stop_epoch"], m["final_val_acc"]), textcoords="offset points",
                            xytext=(-10, -28 - 12 * i), ha="right", fontsize=8, color=color)
    target = next(iter(runs.values()))["target_acc"]
    acc_ax.axhline(target, color="gray", lw=1, label=f"target {target}%")
    acc_ax.set_ylim(max(90.0, acc_ax.get_ylim()[0]), 100)
    acc_ax.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    loss_ax.set(title="Loss", xlabel="epoch", ylabel="cross-entropy", yscale="log")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def draw_curves(runs: dict[str, dict], path: str | Path) -> None:
    """`curves_figure` of `runs` into `path` (PNG)."""
    fig = curves_figure(runs)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mnist_dist.plot", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding metrics.json")
    parser.add_argument("-o", "--output", type=Path, help="PNG to write (default: RUN_DIR/curves.png "
                                                          "for one run, curves.png for several)")
    args = parser.parse_args(argv)
    runs = {}
    for run in args.runs:
        try:
            runs[run.name] = json.loads((run / "metrics.json").read_text())
        except (OSError, ValueError) as err:
            parser.error(f"cannot read {run / 'metrics.json'}: {err}")
    out = args.output or (args.runs[0] / "curves.png" if len(runs) == 1 else Path("curves.png"))
    try:
        draw_curves(runs, out)
    except OSError as err:
        parser.error(f"cannot write {out}: {err.strerror}")
    print(out)


def confusion_figure(confusion) -> plt.Figure:
    """The 10x10 confusion matrix (rows: true digit, columns: predicted) with counts in the cells."""
    confusion = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=100)
    ax.imshow(confusion, cmap="Blues", norm=matplotlib.colors.LogNorm(vmin=1, vmax=max(int(confusion.max()), 2)))
    for (i, j), n in np.ndenumerate(confusion):
        if n:
            ax.text(j, i, int(n), ha="center", va="center", fontsize=7, color="white" if i == j else "black")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true", title="Test confusion matrix")
    fig.tight_layout()
    return fig


def mistakes_figure(images, true, pred, limit: int = 48) -> plt.Figure:
    """A grid of misclassified digits, each captioned 'true -> predicted'. One image of tiles with text
    captions, not one axes per digit: laying out 48 axes took over a second at the end of every run."""
    images = torch.as_tensor(images).float().reshape(-1, 1, 28, 28)[:limit]
    n, cols, pad = len(images), 8, 6  # 28-pixel digits, 6 pixels apart
    cell = 28 + pad
    images = images / images.max() if n else torch.zeros(1, 1, 28, 28)  # ink at 1, as the white margins
    tiles = make_grid(images, nrow=cols, padding=pad, pad_value=1)[0].numpy()
    fig, ax = plt.subplots(figsize=(cols * 1.1, tiles.shape[0] / cell * 1.25 + 0.3), dpi=100)
    ax.imshow(tiles, cmap="gray", interpolation="nearest")
    ax.axis("off")
    for k in range(n):
        r, c = divmod(k, cols)
        ax.text(c * cell + pad + 14, r * cell + pad - 0.5, f"{int(true[k])} -> {int(pred[k])}", ha="center",
                va="bottom", fontsize=8, color="C3")
    ax.set_title(f"Misclassified test digits (first {n}), true -> predicted", fontsize=9)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main())


def final_figures(images, final) -> dict:
    """TensorBoard's pictures of the final scoring (a metrics.Score over `images`): the misclassified digits and
    the confusion matrix."""
    wrong = (final.pred != final.true).nonzero().flatten()
    return {"test/mistakes": mistakes_figure(images[wrong], final.true[wrong], final.pred[wrong]),
            "test/confusion_matrix": confusion_figure(final.confusion())}
