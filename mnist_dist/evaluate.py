"""Score saved weights on the 10,000 MNIST test images: accuracy, per class, confusion matrix.

    python -m mnist_dist.evaluate runs/20240101-120000            # a run folder or a .safetensors file
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m mnist_dist.evaluate RUN

Any number of processes gives the same numbers: the test set is sharded over them and
`gather_for_metrics` counts every image exactly once.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from mnist_dist import job
from mnist_dist.data import DeviceMNIST, load_tensors, prepare_mnist, whole_batch
from mnist_dist.distributed import together, use_cpu
from mnist_dist.errors import RunError
from mnist_dist.metrics import score
from mnist_dist.model import load_net


def summarize(confusion: torch.Tensor) -> dict:
    """The JSON result: accuracy and per-class accuracy in percent, counts, and the matrix."""
    correct, total = int(confusion.trace()), int(confusion.sum())
    return {"accuracy": 100 * correct / total, "correct": correct, "total": total,
            "per_class": (100 * confusion.diag().double() / confusion.sum(1).clamp(min=1)).tolist(),
            "confusion": confusion.tolist()}


def report(r: dict) -> str:
    lines = [f"test accuracy {r['accuracy']:.2f}% ({r['correct']}/{r['total']})", "per-class accuracy:"]
    lines += [f"  {c}: {acc:6.2f}%  ({r['confusion'][c][c]}/{sum(r['confusion'][c])})"
              for c, acc in enumerate(r["per_class"])]
    lines += ["confusion matrix (rows: true digit, columns: predicted):",
              "true\\pred" + "".join(f"{c:>6}" for c in range(10))]
    lines += [f"{c:>9}" + "".join(f"{n:>6}" for n in row) for c, row in enumerate(r["confusion"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mnist_dist.evaluate", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("weights", help="run folder (its model.safetensors) or a .safetensors file")
    parser.add_argument("--data-dir", default="data", help="MNIST root; filled from the offline copy if empty")
    parser.add_argument("--batch-size", type=int, default=1000, help="test images per step, per process")
    parser.add_argument("--json", help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    accelerator = Accelerator(cpu=use_cpu(torch.cuda.is_available()))
    try:
        # Every rank loads (and so fails) alike: no rank is left waiting in a collective.
        net = load_net(args.weights).to(accelerator.device)
        root = together(prepare_mnist, args.data_dir)  # as training does: one error for every rank
        test_set = DeviceMNIST(*load_tensors(root, train=False), accelerator.device)
        loader = accelerator.prepare(DataLoader(test_set, batch_size=args.batch_size, collate_fn=whole_batch))
        result = summarize(score(net, loader, accelerator).confusion())
        if accelerator.is_main_process:
            print(report(result))
            if args.json:
                try:
                    Path(args.json).write_text(json.dumps(result, indent=2))
                except OSError as err:
                    raise RunError(f"cannot write '{args.json}' ({err.strerror}).") from None
        return 0
    except RunError as err:
        if accelerator.is_main_process:
            print(f"mnist_dist.evaluate: error: {err}", file=sys.stderr)
        return 2
    finally:
        # Ends the process group: one left for the interpreter's shutdown can abort a rank with
        # SIGABRT after its work is done ("terminate called without an active exception").
        accelerator.end_training()


if __name__ == "__main__":
    job.leave(main())
