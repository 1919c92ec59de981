"""The seed's 9,720-parameter CNN, layer for layer as in its summary table."""
import contextlib
import copy
import io

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
from torch import nn
from torchsummary import summary


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


def to_channels_last(model: nn.Module) -> nn.Module:
    """NHWC weights for every conv after the first block, in place; returns `model`. The first block stays
    NCHW: on the CPU its 8-channel BatchNorm runs 3x slower in NHWC (8.4 against 2.7 ms forward and backward
    at batch 128), more than NHWC saves in its conv. The second conv takes NCHW and gives NHWC (a conv's
    output follows its weight's layout), and the rest of the net stays NHWC."""
    for layer in model.layers[4:]:
        layer.to(memory_format=torch.channels_last)
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def summary_table(model: nn.Module) -> str:
    """torchsummary's layer table for a 1x28x28 input, as text. It runs on a copy with the RNG state
    forked, so printing it changes neither the model's BatchNorm statistics nor the random stream."""
    out = io.StringIO()
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(out):
        summary(copy.deepcopy(model).cpu().float(), (1, 28, 28), device="cpu")
    return out.getvalue()


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d over the batches of every process: the sums are all-reduced with gradients
    (torch.distributed.nn), so N processes compute what one does on the concatenated batch. Unlike
    nn.SyncBatchNorm (GPUs only) it runs on gloo too. BatchNorm2d's parameters and buffers: weights load either way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = self.num_features
        count = x.new_tensor([x.numel() / c])
        totals = dist_nn.all_reduce(torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), count]))
        n = totals[-1]
        mean = totals[:c] / n
        var = totals[c:2 * c] / n - mean * mean  # biased, as BatchNorm normalises with
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)  # unbiased, as BatchNorm tracks
            self.num_batches_tracked += 1
        scale = self.weight * torch.rsqrt(var + self.eps)
        return (x - mean.view(1, c, 1, 1)) * scale.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)


def sync_batchnorm(net: Net, device: torch.device) -> Net:
    """The same network with BatchNorm statistics shared by all processes: nn.SyncBatchNorm where the run
    trains on CUDA, else ours. Chosen by the run's device, not the machine's: a gloo run on the CPU of a
    GPU machine would fail in nn.SyncBatchNorm."""
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(net)
    for i, layer in enumerate(net.layers):
        if isinstance(layer, nn.BatchNorm2d):
            synced = SyncBatchNorm2d(layer.num_features, eps=layer.eps, momentum=layer.momentum)
            synced.load_state_dict(layer.state_dict())
            net.layers[i] = synced
    return net


def graph_training_step(net: Net, batch: int, device: torch.device, precision: str) -> Net:
    """The network with its training forward and backward each replayed as one CUDA graph for full batches of
    `batch` images (torch.cuda.make_graphed_callables, before DDP wraps the network: gradients still reach
    DDP's hooks). Any other shape (an epoch's shorter last batch) and evaluation run eagerly. A step then costs
    two graph launches instead of some hundred kernel launches. The capture's three warm-up passes would move
    the BatchNorm statistics: they are put back, so the run trains from the same state as without graphs."""
    net = net.to(device).train()
    eager, saved = net.forward, [b.clone() for b in net.buffers()]
    sample = torch.zeros(batch, 1, 28, 28, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    # The kernels are fixed at capture: a mixed-precision run captures them under autocast, whose weight cache
    # a graph cannot use (PyTorch asks for cache_enabled=False).
    with torch.autocast("cuda", dtype=dtype, cache_enabled=False) if dtype else contextlib.nullcontext():
        torch.cuda.make_graphed_callables(net, (sample,))
    with torch.no_grad():
        for buffer, value in zip(net.buffers(), saved):
            buffer.copy_(value)
    graphed = net.forward  # falls back to `eager` by itself in eval mode
    net.forward = lambda x: graphed(x) if x.shape == sample.shape else eager(x)
    return net
