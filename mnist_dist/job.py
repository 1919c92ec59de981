"""What ties a trainer to its job: it never outlives its launcher, a signal becomes a checkpoint, and its exit
status says how it ended.

Imported by `mnist_dist.train` before torch, so that a launcher killed during the seconds of imports
leaves no trainer behind either. Standard library only at import, for the same reason.
"""
import atexit
import os
import signal
import socket
import sys
import threading
import time

from mnist_dist.errors import Interrupted, RunError

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


def restarted() -> bool:
    """Whether a scheduler restarted this job: torchrun (--max_restarts) or SLURM (a requeue, preemption)."""
    return any(int(os.environ.get(v, "0")) > 0 for v in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))


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


class StopSignals:
    """Turns SIGINT/SIGTERM into a request to stop, which every rank reads at the loop's next poll (every
    POLL_STEPS steps), saves a checkpoint at and leaves by (`Interrupted`)."""
    def __init__(self):
        self.received: list[int] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.received.append(signum)
        # Ctrl-C twice kills at once; a second SIGTERM does not: a scheduler may signal every process
        # of a job while the launcher forwards its own, and that must not cut the save.
        if signum == signal.SIGINT:
            signal.signal(signum, signal.SIG_DFL)


def ending(work, resume: str) -> int:
    """Run `work()` and return the exit status: 0; 2 for an error the main process says for every rank; 128 + the
    signal for a stop that saved a checkpoint (130 for SIGINT, 143 for SIGTERM); 1 where a process lost the job's
    others. Any other exception is a bug: its traceback is the report."""
    import torch.distributed as dist  # loaded by now: the training imported it

    code = 0
    try:
        work()
    except RunError as err:
        say(f"mnist_dist: error: {err}")
        code = 2
    except Interrupted as stop:
        signum, saved = stop.args
        again = "the same command" + ("" if resume == "auto" else f" plus --resume {saved}")
        say(f"mnist_dist: stopped by {signal.Signals(signum).name}; saved {saved}. Continue with {again}")
        code = 128 + signum
    except (dist.DistError, RuntimeError) as err:
        if not (isinstance(err, dist.DistError) or "gloo" in str(err)):
            raise
        # A collective failed: another process of the job is gone, and its own error says why.
        print(f"mnist_dist: error: process {os.environ.get('RANK', '?')} lost the job's other processes "
              f"({str(err).strip().splitlines()[0][:200]})", file=sys.stderr)
        code = 1
    # The training ends the process group when it finishes; these exits must too. One left for the interpreter's
    # shutdown can abort with SIGABRT ("terminate called without an active exception": gloo's threads).
    if dist.is_initialized():
        dist.destroy_process_group()
    return code
