"""The weights a run evaluates, stops on and saves (--ema): an exponential moving average of the trained ones.

The trained weights of this small network move with every step's augmented batch, and their test accuracy
with them by a few tens of images; their average over the last few hundred steps scores higher and spreads
less from seed to seed (docs/benchmarks.md, "The slow tail"). BatchNorm's running statistics belong to the
trained weights, not to the average, so they are recomputed for the average before each use, on a fixed set
of unaugmented training images. Neither the average nor the recomputation draws a random number: training
goes exactly as without it.
"""
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from torch import nn
from torch.utils.data import DataLoader

# The training images whose activations give the average its BatchNorm statistics (fewer if the run has fewer),
# and how many go through at once: the numbers the average was measured with (docs/benchmarks.md).
BN_IMAGES = 4096
BN_BATCH = 256


class Average:
    """`net` (a copy of the network, prepared for evaluation) kept as the average of `trained`'s parameters.
    Every rank holds the same average: DDP keeps the trained parameters equal on every rank."""

    def __init__(self, trained: nn.Module, net: nn.Module, decay: float, images: DataLoader):
        self.net, self.images, self.decay = net, images, decay
        self._average, self._trained = list(net.parameters()), list(trained.parameters())
        self._stale = True  # the BatchNorm statistics are not yet those of the current average

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (1, 2, ... over the run): the weights of steps 1..step, step s weighted by
        decay^(step - s), normalised to sum to 1, as Adam corrects its moments' bias. The random initial weights
        get no share (torch's get_ema_multi_avg_fn starts from them), so early epochs and short runs score
        the trained weights' recent past. The weight is a function of the step: a resume needs no counter."""
        share = (1 - self.decay) / (1 - self.decay ** step)
        # One foreach lerp over all 16 tensors, its weight a Python number. Not AveragedModel.update_parameters:
        # it tests a counter tensor on every call, and a GPU's host would wait for it at every step.
        torch._foreach_lerp_(self._average, self._trained, share)
        self._stale = True

    @torch.no_grad()
    def ready(self, accelerator: Accelerator) -> nn.Module:
        """The average, with BatchNorm statistics of its own, in eval mode. Every rank must call it (one
        broadcast, so that every rank scores the very network the main process saves)."""
        if self._stale:
            bns = [m for m in self.net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            recompute_batchnorm(self.net, bns, self.images)
            if accelerator.num_processes > 1:
                stats = [t for m in bns for t in (m.running_mean, m.running_var)]
                flat = broadcast(torch.cat([t.flatten() for t in stats]), from_process=0)
                for t, value in zip(stats, flat.split([t.numel() for t in stats])):
                    t.copy_(value.view_as(t))
            self._stale = False
        return self.net.eval()


def recompute_batchnorm(net: nn.Module, bns: list[nn.Module], images: DataLoader) -> None:
    """`bns`' running statistics as the plain mean over `images`' batches, the rest of `net` in eval mode:
    unlike torch.optim.swa_utils.update_bn, dropout stays off, which would draw random numbers and add noise
    that evaluation never sees. The mean is a momentum of 1/k at batch k: BatchNorm's own momentum None
    reads its batch counter to the host, which a GPU would wait for at every layer of every batch."""
    net.eval()
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.train()
    device = next(net.parameters()).device
    for k, (x, _) in enumerate(images, 1):
        for m in bns:
            m.momentum = 1 / k
        net(x.to(device))  # a no-op for the tensor loader's batches, which are on the device already
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
        m.eval()
