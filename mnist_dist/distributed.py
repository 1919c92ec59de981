"""What the processes of a job, and their launcher, must agree on: the device and threads each
process takes, the refusal of launches that would train the wrong thing, errors, and BatchNorm
statistics shared by all of them. A problem found on any rank reaches every rank (`together`), so all
stop at once with one message instead of leaving the others in their next collective until the timeout.
"""
import os
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
from torch import nn
from accelerate import PartialState
from accelerate.utils import gather_object

from mnist_dist.job import LAUNCHED
from mnist_dist.errors import RunError

# What to run instead, for the launches that check_launch refuses.
GPU_PROCESSES = "accelerate launch --multi_gpu --num_processes N -m mnist_dist.train"
CPU_PROCESSES = "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m mnist_dist.train"
# Accelerate's launcher marks these modes in the trainer's environment.
SHARDED = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
           "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}


def use_cpu(cuda_available: bool, env=os.environ) -> bool:
    """The CPU when asked for (`accelerate launch --cpu`, `use_cpu: true`, ACCELERATE_USE_CPU=1) or without
    a GPU. Asking matters under a CPU-only torchrun too: else Accelerate (1.13+) has every rank believe it is alone."""
    if "ACCELERATE_USE_CPU" in env:
        return env["ACCELERATE_USE_CPU"].lower() in ("1", "true", "yes", "on")
    return not cuda_available


def user_chose_threads() -> bool:
    """Whether the thread count was the user's choice rather than the launcher's default.

    `accelerate launch` always sets OMP_NUM_THREADS (1 with no config on a CPU-only machine), and torchrun
    sets 1 for several processes. The user's choice shows in the launcher's environment or its command line
    (--num_cpu_threads_per_process); without a launcher, our own environment is the user's.
    """
    if "OMP_NUM_THREADS" not in os.environ or not LAUNCHED & os.environ.keys():
        return "OMP_NUM_THREADS" in os.environ
    try:
        parent = psutil.Process().parent()
        return "OMP_NUM_THREADS" in parent.environ() or any(
            a.replace("-", "_").startswith("__num_cpu_threads_per_process") for a in parent.cmdline())
    except (psutil.Error, AttributeError):  # no parent, or another user's: trust the environment
        return True


def cores() -> int:
    """The cores this process may run on: its CPU affinity on Linux, every core where there is none (macOS, Windows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads() -> int:
    """Give this process its share of the cores it may run on, unless the user chose; returns the count."""
    if not user_chose_threads():
        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, cores() // per_machine))
    return torch.get_num_threads()


def join_restarted_group(cpu: bool, timeout) -> None:
    """Start the process group of a group that torchrun restarted (--max_restarts) under its own key prefix.

    The agent's store outlives the attempt before and holds its keys: without a prefix a rank can read a dead
    peer's address and fail to connect (gloo's "connectFullMesh failed"; pytorch/pytorch#135712 is the same
    race for NCCL). Accelerate then finds the group started and keeps it.
    """
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if not attempt or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                       is_master=False, timeout=timeout)
    torch.distributed.init_process_group(
        "gloo" if cpu else "nccl", store=torch.distributed.PrefixStore(f"attempt_{attempt}", store),
        rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)


def collective_timeout(seconds: int) -> None:
    """From now on a collective of this process fails after `seconds` (a local setting, no collective: every
    process sets it at the same point). Without a process group (one process) there is nothing to wait for."""
    if dist.is_initialized():
        dist.set_timeout(timedelta(seconds=seconds))


def agree(error: str | None) -> str | None:
    """Every rank's error, if any, to every rank: the first one found, or None. Every rank must call it."""
    return next((e for e in gather_object([error]) if e), None)


def together(fn, *args, main_only: bool = False):
    """`fn(*args)` on every rank (or the main process only); its result. A RunError or OSError on any rank
    is raised as one RunError on all of them (a full disk, say). Any other exception is a bug: its rank
    raises it with its traceback, the others stop with its name instead of waiting. Every rank must call it."""
    result, error, bug = None, None, None
    if not main_only or PartialState().is_main_process:
        try:
            result = fn(*args)
        except OSError as err:
            where = f" '{err.filename}'" if err.filename else ""  # a failed write() carries no file name
            error = f"cannot write{where} ({err.strerror or err})"
        except RunError as err:
            error = str(err)
        except Exception as err:
            bug, error = err, f"{type(err).__name__} in {fn.__name__} on another process: {err}"
    error = agree(error)
    if bug:
        raise bug
    if error:
        raise RunError(error)
    return result


def one_process_for_several() -> bool:
    """Whether `accelerate launch` was asked for several processes or machines and started this one process
    alone: without --multi_gpu it does so wherever it finds fewer GPUs. It then sets MASTER_PORT for the
    trainer (and nothing else that says so); a MASTER_PORT of the user's own is in the launcher's environment too."""
    if "ACCELERATE_DYNAMO_BACKEND" not in os.environ or "WORLD_SIZE" in os.environ or "MASTER_PORT" not in os.environ:
        return False
    try:
        return "MASTER_PORT" not in psutil.Process().parent().environ()
    except (psutil.Error, AttributeError):  # no parent, or another user's: cannot tell
        return False


def check_launcher() -> None:
    """Refuse, from the environment alone and before any process group starts, the launch modes that would
    train the wrong thing or fail later in a traceback. Every rank alike."""
    if one_process_for_several():
        raise RunError("accelerate launch started one process, not the several asked for: it runs several only "
                       f"with --multi_gpu. Use '{GPU_PROCESSES}' on GPUs, '{CPU_PROCESSES}' without them.")
    sharded = [name for var, name in SHARDED.items() if os.environ.get(var, "").lower() in ("1", "true")]
    if sharded:
        raise RunError(f"{sharded[0]} shards large models over processes; this network's 9,720 parameters have "
                       "nothing to shard, and every process holds them whole under DDP. Launch with --multi_gpu "
                       f"instead: '{GPU_PROCESSES}' on GPUs, '{CPU_PROCESSES}' without them.")


def check_launch(state: PartialState, mixed_precision: str) -> None:
    """Refuse the launch modes that would silently train the wrong thing, seen once the processes are up."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and state.num_processes == 1:
        raise RunError(f"{launched} processes were launched but Accelerate sees a single process, so every one "
                       "would train on all the data and write the same files. On a machine without GPUs use "
                       f"'{CPU_PROCESSES}' (with torchrun, set ACCELERATE_USE_CPU=1).")
    if mixed_precision == "fp16" and state.device.type == "cpu":
        raise RunError("fp16 mixed precision needs a CUDA GPU; on the CPU Accelerate would silently train in "
                       "fp32. Use --mixed_precision bf16 (CPU autocast) or no.")


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


def sync_batchnorm(net: nn.Module, device: torch.device) -> nn.Module:
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
