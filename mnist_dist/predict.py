"""Classify photos or drawings of single digits with trained weights.

    python -m mnist_dist.predict --weights runs/20240101-120000 three.png seven.jpg
    python -m mnist_dist.predict digit.png        # weights: the newest runs/*/model.safetensors

Images of any size are first brought to MNIST's form (`to_mnist`): the network has only ever seen that.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from mnist_dist.data import MEAN, STD
from mnist_dist.model import load_net
from mnist_dist.errors import RunError

INK = 0.1  # pixels above this fraction of the strongest stroke count as ink for the bounding box


def to_mnist(image: Image.Image) -> torch.Tensor:
    """One digit image as a normalised 1x28x28 tensor, prepared as MNIST's own digits were: light ink on
    black, the bounding box scaled to fit 20x20 (aspect kept) and pasted into 28x28, centre of mass at the centre."""
    # Transparent pixels count as white paper; then one grey channel in [0, 1].
    rgba = image.convert("RGBA")
    gray = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("L")
    x = pil_to_tensor(gray)[0].float() / 255
    border = torch.cat([x[0], x[-1], x[:, 0], x[:, -1]])
    if border.mean() > x.mean():  # the border is paper: lighter than average means dark ink
        x, border = 1 - x, 1 - border
    # Paper to 0 and the strongest stroke to 1, so grey paper or faint ink look like MNIST.
    x = (x - border.median()).clamp(min=0)
    if x.max() == 0:  # a confident digit for an empty page would be a made-up answer
        raise ValueError("no digit: the image is one flat shade")
    x = x / x.max()
    rows, cols = (x > INK).nonzero(as_tuple=True)
    x = x[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    scale = 20 / max(x.shape)
    size = [max(1, round(n * scale)) for n in x.shape]
    # antialias: large photos shrink without aliasing, like MNIST's anti-aliased originals.
    x = F.interpolate(x[None, None], size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0]
    x = x.clamp(0, 1)
    h, w = x.shape
    cy = (x.sum(1) * torch.arange(h)).sum() / x.sum()
    cx = (x.sum(0) * torch.arange(w)).sum() / x.sum()
    # Shift the centre of mass to the field's centre (13.5), keeping the whole digit inside.
    top = min(max(round(13.5 - float(cy)), 0), 28 - h)
    left = min(max(round(13.5 - float(cx)), 0), 28 - w)
    field = torch.zeros(28, 28)
    field[top:top + h, left:left + w] = x
    return ((field - MEAN) / STD)[None]


def newest_run(runs: Path = Path("runs")) -> Path:
    """The run folder under `runs` whose model.safetensors was written last."""
    found = sorted(runs.glob("*/model.safetensors"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise RunError(f"no trained weights under '{runs}/' (no {runs}/*/model.safetensors); "
                       "train with 'python -m mnist_dist.train' or pass --weights.")
    return found[-1].parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mnist_dist.predict", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files, one digit each")
    parser.add_argument("--weights", help="run folder or .safetensors file (default: the newest run under runs/)")
    args = parser.parse_args(argv)
    try:
        net = load_net(args.weights or newest_run())
    except RunError as err:
        print(f"mnist_dist.predict: error: {err}", file=sys.stderr)
        return 2
    status = 0
    for path in args.images:
        try:
            with Image.open(path) as image:
                x = to_mnist(image)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            # One bad file should not hide the answers for the others, but the exit status tells.
            print(f"mnist_dist.predict: error: skipped '{path}' ({type(err).__name__}: {err})", file=sys.stderr)
            status = 2
            continue
        with torch.inference_mode():
            p = net(x[None]).softmax(1)[0]
        print(f"{path}: {int(p.argmax())} (p={float(p.max()):.3f})")
    return status


if __name__ == "__main__":
    sys.exit(main())
