"""What changes how fast the network trains, never what it computes: the allocator, memory layout, CUDA graphs."""
import contextlib
import ctypes
import platform

import torch
from torch import nn


def tune(net: nn.Module, s, device: torch.device, precision: str) -> nn.Module:
    """`net` made faster as the settings `s` ask: channels_last, then torch.compile or CUDA graphs."""
    if s.channels_last:
        net = to_channels_last(net)
    if s.compile:
        net = torch.compile(net)
    if s.cuda_graphs:
        net = graph_training_step(net, s.batch_size, device, precision)
    return net


def keep_freed_memory() -> None:
    """Let glibc keep freed memory (blocks under 32 MiB, up to 1 GiB) for the next step. By default each
    step page-faults its few MB of activations in afresh: a fifth of a CPU step here (4,800 against 6,000 img/s).
    Nothing elsewhere: macOS, Windows and musl have other allocators, and those numbers mean nothing to them."""
    if platform.libc_ver()[0] != "glibc":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD, from glibc's malloc.h
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # a glibc we cannot load by that name
        return


def to_channels_last(model: nn.Module) -> nn.Module:
    """NHWC weights for every conv after the first block, in place; returns `model`. The first block stays
    NCHW: on the CPU its 8-channel BatchNorm runs 3x slower in NHWC (8.4 against 2.7 ms forward and backward
    at batch 128), more than NHWC saves in its conv. The second conv takes NCHW and gives NHWC (a conv's
    output follows its weight's layout), and the rest of the net stays NHWC."""
    for layer in model.layers[4:]:
        layer.to(memory_format=torch.channels_last)
    return model


def graph_training_step(net: nn.Module, batch: int, device: torch.device, precision: str) -> nn.Module:
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
