"""The seed's 9,720-parameter CNN, layer for layer as in its summary table."""
import torch
from torch import nn


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
    """torchsummary's layer table for a 1x28x28 input, as text.

    It runs on a copy with the RNG state forked, so printing it changes
    neither the model's BatchNorm statistics nor the random stream.
    """
    import contextlib
    import copy
    import io

    from torchsummary import summary

    out = io.StringIO()
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(out):
        summary(copy.deepcopy(model).cpu().float(), (1, 28, 28), device="cpu")
    return out.getvalue()
