"""The seed's 9,720-parameter CNN, layer for layer as in its summary table; its summary and its saved weights."""
import contextlib
import copy
import io
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torchsummary import summary

from mnist_dist.errors import RunError


def conv_block(c_in: int, c_out: int, dropout: float, padding: int = 1) -> list[nn.Module]:
    """Conv2d(3x3, no bias) -> ReLU -> BatchNorm2d -> Dropout2d, the seed's order."""
    return [
        nn.Conv2d(c_in, c_out, 3, padding=padding, bias=False),
        nn.ReLU(),
        nn.BatchNorm2d(c_out),
        nn.Dropout2d(dropout),
    ]


class Net(nn.Module):
    """1x28x28 image -> 10 class logits; 9,720 trainable parameters."""

    def __init__(self, dropout: float = 0.05):
        super().__init__()
        self.layers = nn.Sequential(
            *conv_block(1, 8, dropout),  # 28x28
            *conv_block(8, 16, dropout),
            nn.MaxPool2d(2),  # 14x14
            *conv_block(16, 16, dropout),
            *conv_block(16, 16, dropout),
            nn.MaxPool2d(2),  # 7x7
            *conv_block(16, 16, dropout, padding=0),  # 5x5
            # The last conv has no ReLU/BN/dropout: its outputs are the logits.
            nn.Conv2d(16, 10, 3, bias=False),  # 3x3
            nn.AdaptiveAvgPool2d(1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).flatten(1)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def summary_table(model: nn.Module) -> str:
    """torchsummary's layer table for a 1x28x28 input, as text. It runs on a copy with the RNG state
    forked, so printing it changes neither the model's BatchNorm statistics nor the random stream."""
    out = io.StringIO()
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(out):
        summary(copy.deepcopy(model).cpu().float(), (1, 28, 28), device="cpu")
    return out.getvalue()


def load_net(path: str | Path) -> Net:
    """A Net in eval mode with the weights of a run or checkpoint folder (its model.safetensors) or a
    .safetensors file."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise RunError(f"no weights at '{file}': pass a run folder holding model.safetensors or a .safetensors file.")
    try:
        net = Net()  # a checkpoint of a --compile run names its weights _orig_mod.*
        net.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in load_file(file).items()})
    except Exception as err:  # not safetensors, truncated, unreadable, or another model's weights
        detail = " ".join(str(err).split())[:300]  # a state_dict mismatch lists the keys on later lines
        raise RunError(f"cannot load weights from '{file}' ({type(err).__name__}: {detail}).") from None
    return net.eval()
