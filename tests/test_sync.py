"""The GPU path: a training step that never waits for the host, checked on the CPU.

On a GPU the host waits for the device at a copy from pageable memory (a tensor made from Python data),
at `.item()`, `.tolist()`, `.cpu()` and `.numpy()`. A CPU run counts those calls instead
(tests/sync_probe/sitecustomize.py).
"""
import json
import sys

import pytest
import torch
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from accelerate.state import PartialState
from torch import nn
from torch.utils.data import DataLoader

from mnist_dist.data import DeviceMNIST, consecutive_runs, whole_batch
from mnist_dist.distributed import SyncBatchNorm2d, sync_batchnorm
from mnist_dist.model import Net

from conftest import REPO, read_metrics, run


def test_consecutive_runs():
    assert consecutive_runs([3, 4, 5]) == [slice(3, 6)]
    assert consecutive_runs([998, 999, 0, 1, 2]) == [slice(998, 1000), slice(0, 3)]
    assert consecutive_runs([7]) == [slice(7, 8)]


@pytest.fixture
def state():
    yield PartialState(cpu=True)
    PartialState._reset_state()


@pytest.mark.parametrize("n, batch, world", [(1000, 64, 1), (1000, 64, 2), (1000, 64, 3), (100, 64, 2), (130, 16, 4)])
def test_the_device_order_is_accelerates_seedable_sampler_order(state, n, batch, world):
    """What each rank trains on, batch by batch, per epoch and after a mid-epoch skip: the dataset's own
    shuffle against Accelerate's sampler over the same images (label i marks image i), padding included."""
    def batches(shuffled_by_dataset: bool, rank: int, epoch: int, skip: int = 0) -> list[list[int]]:
        ds = DeviceMNIST(torch.zeros(n, 28, 28, dtype=torch.uint8), torch.arange(n), "cpu")
        loader = DataLoader(ds.shuffle(7) if shuffled_by_dataset else ds, batch_size=batch,
                            shuffle=not shuffled_by_dataset, collate_fn=whole_batch)
        loader = prepare_data_loader(loader, num_processes=world, process_index=rank, put_on_device=False,
                                     use_seedable_sampler=True, data_seed=7)
        loader.set_epoch(epoch)
        return [y.tolist() for _, y in (skip_first_batches(loader, skip) if skip else loader)]

    for rank in range(world):
        for epoch, skip in ((1, 0), (2, 0), (2, 1)):
            assert batches(True, rank, epoch, skip) == batches(False, rank, epoch, skip)
    assert batches(True, 0, 1) != batches(True, 0, 2)


def test_sync_batchnorm_is_chosen_by_the_runs_device():
    """nn.SyncBatchNorm for a run on CUDA; ours (it works over gloo) for a run on the CPU, GPU or not."""
    on_cpu = sync_batchnorm(Net(), torch.device("cpu"))
    assert sum(isinstance(m, SyncBatchNorm2d) for m in on_cpu.modules()) == 5
    on_cuda = sync_batchnorm(Net(), torch.device("cuda"))  # converting needs no GPU
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in on_cuda.modules()) == 5
    assert not any(isinstance(m, SyncBatchNorm2d) for m in on_cuda.modules())


def test_a_run_waits_for_the_host_at_most_once_every_two_steps(tmp_path, mnist_root):
    """300 steps (3 epochs of 100) and their 3 evaluations, counted from process start to exit. What remains
    is once per poll (every 10 steps), a few per epoch, and set-up work on host tensors that a GPU run does
    not wait for either, but that the CPU cannot tell apart: torchsummary's table (about 70 calls).
    --report-to none: TensorBoard's figure of mistakes reads host copies, 2 calls per digit drawn.
    Measured: 116 calls here (0.39 per step); the code before (897ed7b) made 1,067 (3.6 per step): a copy of
    each batch's indices, two tensors of counts per step, and a copy per evaluation batch."""
    counts = tmp_path / "counts"
    counts.mkdir()
    out = tmp_path / "run"
    result = run([sys.executable, "-m", "mnist_dist.train", "--epochs", "3", "--train-limit", "6400",
                  "--test-limit", "500", "--target-acc", "100", "--report-to", "none", "--data-dir", str(mnist_root),
                  "--output-dir", str(out)], timeout=300,
                 env={"PYTHONPATH": str(REPO / "tests" / "sync_probe"), "SYNC_COUNT": str(counts)})
    assert result.returncode == 0, result.stderr
    steps = sum(e["train_images"] for e in read_metrics(out)["epochs"]) // 64
    assert steps == 300
    [found] = [json.loads(p.read_text())["counts"] for p in counts.iterdir()]
    assert sum(found.values()) <= 0.5 * steps, found
