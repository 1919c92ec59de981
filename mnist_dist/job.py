"""What ties a trainer to its job: it never outlives its launcher, and its run folder serves one job at a time.

Imported by `mnist_dist.train` before torch, so that a launcher killed during the seconds of imports
leaves no trainer behind either. Standard library only, for the same reason.
"""
import atexit
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from mnist_dist.settings import RunError

try:
    import fcntl
except ImportError:  # Windows: the run folder is not locked there
    fcntl = None

# Set in the trainer's environment by `accelerate launch` and by torchrun, respectively.
LAUNCHED = {"ACCELERATE_DYNAMO_BACKEND", "TORCHELASTIC_RUN_ID"}
# Seconds a trainer whose launcher died has to save its checkpoint (at its next step) and exit. A save
# takes about a second here; past this the trainer is taken to be stuck (in a collective, say) and exits.
GRACE = 20
# Seconds a rank that fails with the job's error waits for the main process to say it and exit (`leave`);
# the launcher notices an exit within a tenth of a second.
SPEAK = 5
# Set once the training loop polls for stop requests: a SIGTERM is then turned into a checkpoint.
training = threading.Event()


def say(message: str) -> None:
    """Print on stderr once per job: every rank fails alike, the main process speaks."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def _exit_orphaned(launcher: int | None, why: str) -> None:
    say(f"mnist_dist: error: the launcher{f' (PID {launcher})' if launcher else ''} is gone; {why}")
    os._exit(1)


def _agent_gone() -> bool:
    """Whether torchrun's agent (also `accelerate launch --multi_gpu`'s) died before this trainer began to watch
    it: in a trainer's first milliseconds the change of parent may already have happened. The agent hosts the
    job's store (TORCHELASTIC_USE_AGENT_STORE) from before it starts the trainers, so nothing listening at
    MASTER_ADDR:MASTER_PORT means it is gone. Any other doubt counts as alive."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return False
    try:
        socket.create_connection((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])), timeout=5).close()
    except ConnectionRefusedError:
        return True
    except (OSError, KeyError, ValueError):
        pass
    return False


def watch_launcher(every: float = 0.2) -> None:
    """Under a launcher, end this process soon after the launcher dies, however it dies (kill -9, the OOM
    killer, a node agent) and wherever the trainer is. A training run first gets SIGTERM, which it turns into
    a checkpoint at its next step, as for any SIGTERM. Before training (imports, a process-group start waiting
    on the dead launcher's store), or if the save takes over GRACE seconds, it exits with one line.

    The launcher's death shows as a change of parent, wherever orphans go: PID 1, or a subreaper (systemd,
    tini, a container runtime). Without a launcher it does nothing: `nohup python -m ...` outlives its shell.
    """
    if not LAUNCHED & os.environ.keys():
        return
    launcher, exiting = os.getppid(), threading.Event()
    if _agent_gone():
        _exit_orphaned(None, "it stopped before training began.")
    # The thread ends before the interpreter does: one woken during its shutdown could be cut off mid-frame.
    atexit.register(exiting.set)

    def watch():
        while os.getppid() == launcher:
            if exiting.wait(every):
                return
        if not training.is_set():
            _exit_orphaned(launcher, "it stopped before training began.")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(GRACE)  # the main thread exits after its save, ending this thread with it
        _exit_orphaned(launcher, f"no checkpoint could be saved within {GRACE} s.")

    threading.Thread(target=watch, name="watch-launcher", daemon=True).start()


def leave(code: int) -> None:
    """End this process with `code`; 2 is an error the main process says for every rank (`say`).

    One of several (WORLD_SIZE > 1) runs Python's exit handlers (trackers, DataLoader workers, logging),
    flushes its output, and skips the native teardown that follows: there a rank whose run had finished, its
    files written and its process group destroyed, was seen to abort now and then ("terminate called without
    an active exception", SIGABRT in 2 of 3 runs of the test suite on one machine), and the launcher then
    reports the whole job as failed.

    A rank other than the main one that fails with error 2 first leaves the main process SPEAK seconds to say
    it: the launcher stops every rank as soon as one exits, and a main process stopped first ends the job silent.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        sys.exit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 2 and os.environ.get("RANK", "0") != "0" and LAUNCHED & os.environ.keys():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the launcher's stop, once the main process has exited
        time.sleep(SPEAK)
    os._exit(code)


def hold(folder: Path) -> None:
    """Hold `folder` for the rest of this process's life (the main process's): a second job on it is refused,
    naming the holder's PID and host. The kernel releases the lock when the process dies, however it dies, so a
    killed job never blocks the next one. Nothing is written before the folder is known to be free."""
    if fcntl is None:
        return
    path = folder / "job.lock"
    # Held open read-only: a file open for writing would keep its disk from being remounted read-only.
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunError(f"'{folder}' is in use by another job ({holder}). Wait for it to end or stop it; "
                       "two jobs in one run folder would overwrite each other's checkpoints.") from None
    # The descriptor stays open, and the lock held, until the process ends.
    path.write_text(f"PID {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
