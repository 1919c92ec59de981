"""The run folder: its name, the claim and lock one job holds on it, its files, and writes that are atomic and
durable.

A rename publishes a file at once, but says nothing of whether its data has reached the disk: after a power
loss the new name can point at an empty file. So every file that must survive a crash is written under a
temporary name, flushed (fsync), renamed, and then the folder holding the new name is flushed too.
"""
import dataclasses
import json
import os
import platform
import socket
import time
from datetime import datetime
from pathlib import Path

import accelerate
import filelock
import psutil
import torch
import torchvision
from safetensors.torch import save

from mnist_dist import job
from mnist_dist.plot import draw_curves
from mnist_dist.errors import RunError

try:
    import fcntl
except ImportError:  # Windows: the run folder is not locked there
    fcntl = None


def flush_file(path: Path) -> None:
    """Wait until `path`'s data is on the disk (fsync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flush_folder(folder: Path) -> None:
    """Wait until `folder`'s entries (a file renamed into it, say) are on the disk. Windows cannot open a
    folder, and its renames are written through: nothing to do there."""
    if os.name == "nt":
        return
    flush_file(folder)


def write_atomic(path: Path, write, exclusive: bool = False) -> None:
    """`write(tmp)` to a temporary name beside `path`, flushed, then renamed and the folder flushed: a kill or a
    power loss leaves the old file or the whole new one. `exclusive`: FileExistsError if `path` exists, so two
    runs cannot both claim one folder."""
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        flush_file(tmp)
        (os.link if exclusive else os.replace)(tmp, path)
        flush_folder(path.parent)
    except OSError as err:  # named: a failed write (a full disk) carries no file name
        raise OSError(err.errno, err.strerror or str(err), str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)


def run_name(output_dir: str, resume: str) -> str:
    """The run folder (main process's choice): --output-dir, the run of --resume PATH, or a new
    runs/<launch time>-<launcher pid>, which a group restarted by its launcher finds again."""
    if output_dir:
        return output_dir
    if resume not in ("", "latest", "auto"):  # PATH: a run folder, or one of its checkpoints RUN/checkpoints/epoch_NNNN
        path = Path(resume).resolve()
        return str(path if (path / "checkpoints").is_dir() else path.parent.parent)
    launcher = psutil.Process()
    if job.LAUNCHED & os.environ.keys():
        launcher = launcher.parent()
    return f"runs/{datetime.fromtimestamp(launcher.create_time()):%Y%m%d-%H%M%S}-{launcher.pid}"


_held = []  # the locks this process holds, kept from the garbage collector


def hold(folder: Path) -> None:
    """Hold `folder` for the rest of this process's life (the main process's): a second job on it is refused,
    naming the holder's PID and host. The kernel releases the lock when the process dies, however it dies, so a
    killed job never blocks the next one. Nothing is written before the folder is known to be free.

    flock by hand on Unix, not filelock: its lock file stays open for writing while held, and an open file for
    writing keeps its disk from being remounted read-only (tests/test_errors.py turns a run folder read-only)."""
    path = folder / "job.lock"
    busy = f"'{folder}' is in use by another job ({{}}). Wait for it to end or stop it; two jobs in one run " \
           "folder would overwrite each other's checkpoints."
    if fcntl is None:  # Windows: filelock's msvcrt lock, released by the system when the process dies
        lock = filelock.FileLock(path)
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            raise RunError(busy.format("another process")) from None
        _held.append(lock)
        return
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunError(busy.format(holder)) from None
    # The descriptor stays open, and the lock held, until the process ends.
    path.write_text(f"PID {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")


def claim(out: Path, info: dict, fresh: bool) -> None:
    """Hold the run folder for this job, and write its config.json (main process); a fresh run may not reuse
    a run's folder."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        flush_folder(out.parent)  # the new folder's own name, durable with what goes into it
        hold(out)
        (out / "checkpoints").mkdir(exist_ok=True)
        write_atomic(out / "config.json", lambda p: p.write_text(json.dumps(info, indent=2)), exclusive=fresh)
    except FileExistsError:
        # --resume auto, not --resume: it also takes a run killed before its first checkpoint, which it restarts.
        raise RunError(f"'{out}' already holds a run. To continue it, add --resume auto; to start anew, pass a new "
                       "--output-dir (or leave it out for a fresh runs/<time>-<pid>).") from None
    except OSError as err:
        raise RunError(f"cannot write the run folder '{out}' ({err.strerror}); choose another --output-dir.") from None


def describe(s, accelerator: accelerate.Accelerator, out: Path, threads: int) -> dict:
    """What config.json records: the resolved settings, where the run ran, and the versions."""
    return {**dataclasses.asdict(s), "output_dir": str(out), "world_size": accelerator.num_processes,
            "global_batch": s.batch_size * accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
            "threads": threads, "distributed_type": str(accelerator.distributed_type), "device": str(accelerator.device),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "torchvision": torchvision.__version__, "accelerate": accelerate.__version__}}


def banner(info: dict, params: int, steps: int) -> str:
    """The run in one line, from its config.json `info`: what the log shows before the first epoch."""
    return (f"{params:,} parameters | {info['world_size']} process(es), {info['distributed_type']}, {info['threads']} "
            f"thread(s) each, precision {info['mixed_precision']} | global batch {info['global_batch']}, {steps} "
            f"steps/epoch | run folder {info['output_dir']}")


def write_results(out: Path, weights: dict, metrics: dict) -> None:
    """The run's final files (main process): the weights, metrics and the graph, each written whole or not at all."""
    # channels_last weights are strided views; safetensors stores contiguous tensors. Serialised in
    # memory and written by Python, so that a full disk is an OSError naming the file.
    data = save({k: v.contiguous() for k, v in weights.items()})
    write_atomic(out / "model.safetensors", lambda p: p.write_bytes(data))
    write_atomic(out / "metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2)))
    write_atomic(out / "curves.png", lambda p: draw_curves({out.name: metrics}, p))
