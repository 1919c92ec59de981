"""Imported at start-up by every Python process whose PYTHONPATH holds this folder (tests only): what the
programs do, seen from inside, and faults triggered by the run reaching a named step, never by the clock.

PROBE_LOG=DIR: each process appends what it writes (opens for writing, folders made, renames,
links) to DIR/rank<RANK>.log, one path per line, through Python's audit hooks.
PROBE_DTYPES=1 (with PROBE_LOG): also the output dtype and batch size of every Conv2d forward in training.
PROBE_AT=WHEN and PROBE_DO=SIGNAL>TARGET or PAUSE: a fault, once, in the trainer of rank PROBE_RANK (default 0)
of the job's first start (never in a launcher, nor in a group that torchrun restarted, nor in a job that SLURM
requeued: the continuation runs clean). WHEN is "import:MODULE" (that import begins) or
"call:MODULE.FUNCTION[:N]" (the N-th call of that Python function in the main thread: mnist_dist.poll.poll
runs every 10 steps and at each epoch's last step, accelerate.accelerator.save_state at each checkpoint).
SIGNAL is KILL, TERM or INT; TARGET is self, launcher (the trainer's parent) or job (every process of the job's
process group: launcher, trainers, DataLoader workers, as a scheduler's scancel signals them).
PAUSE: the trainer writes "probe: paused at WHEN (PID N)" to stderr and waits there until a signal with a Python
handler arrives (the trainer's SIGTERM/SIGINT, which only record it, or SIGUSR2), then goes on: a test sends a
signal from outside (scancel, scontrol requeue) at that very step, or changes the world (fills a disk) and
sends SIGUSR2. Past PROBE_PAUSE_MAX seconds (default 120) with none,
it says so and exits 1: a lost signal fails the test instead of hanging it. The other ranks wait meanwhile
in their next collective (the trainer's --timeout, 120 s by default).
"""
import os
import sys

LOG = os.environ.get("PROBE_LOG")
if LOG:
    rank = os.environ.get("RANK", "0")
    out = open(os.path.join(LOG, f"rank{rank}.log"), "a", buffering=1)

    def audit(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1] or "", args[2] or 0
            if any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                out.write(f"write {os.fsdecode(args[0])}\n")
        elif event in ("os.mkdir", "os.rename", "os.link"):
            out.write(f"{event} {' '.join(os.fsdecode(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike)))}\n")

    sys.addaudithook(audit)

    if os.environ.get("PROBE_DTYPES"):
        import torch

        def record(module, inputs, output):
            if isinstance(module, torch.nn.Conv2d) and module.training:
                out.write(f"conv {output.dtype} batch {len(output)}\n")

        torch.nn.modules.module.register_module_forward_hook(record)


def is_trainer(argv: list[str]) -> bool:
    """`python [-u ...] -m mnist_dist.train ...`, as every launcher starts a trainer; not the launcher itself,
    whose own command line (accelerate, torchrun) names the module too."""
    if "-m" not in argv:
        return False
    i = argv.index("-m")
    return all(a.startswith("-") for a in argv[1:i]) and argv[i + 1:i + 2] == ["mnist_dist.train"]


def first_start() -> bool:
    """Neither a group that torchrun restarted nor a job that SLURM requeued (which keeps its environment,
    PROBE_* included): the fault happens once, and the run it interrupted then continues."""
    return all(os.environ.get(v, "0") == "0" for v in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))


def pause(at: str) -> None:
    """Wait until a signal with a Python handler arrives (its handler has run by the time the trainer goes on),
    or exit 1 past PROBE_PAUSE_MAX s. Python's C-level handler writes to a wakeup pipe, which select() waits on:
    signal.pause() would miss a signal sent as soon as the line below is read and landing just before it began."""
    import select
    import signal

    limit = float(os.environ.get("PROBE_PAUSE_MAX", "120"))
    r, w = os.pipe()
    os.set_blocking(w, False)  # set_wakeup_fd's demand: a handler must never block on it
    old = signal.set_wakeup_fd(w)
    # A handler, so that SIGUSR2 wakes the pause too. Not SIGCONT: SLURM sends it before the SIGTERM of a requeue.
    wake = signal.signal(signal.SIGUSR2, lambda *_: None)
    try:
        sys.stderr.write(f"probe: paused at {at} (PID {os.getpid()})\n")
        sys.stderr.flush()
        woken = select.select([r], [], [], limit)[0]
    finally:
        signal.signal(signal.SIGUSR2, wake)
        signal.set_wakeup_fd(old)
        os.close(r)
        os.close(w)
    if not woken:
        sys.stderr.write(f"probe: no signal {limit:g} s after the pause at {at}; exiting\n")
        sys.stderr.flush()
        os._exit(1)


AT, DO = os.environ.get("PROBE_AT"), os.environ.get("PROBE_DO")
if AT and DO and is_trainer(sys.orig_argv) and os.environ.get("RANK", "0") == os.environ.get("PROBE_RANK", "0") \
        and first_start():
    import signal

    name, target = DO.split(">") if DO != "PAUSE" else ("", "")
    signum, launcher, trainer = name and getattr(signal, f"SIG{name}"), os.getppid(), os.getpid()
    # Forked children (DataLoader workers) inherit the hooks below: they must not fire there.
    os.register_at_fork(after_in_child=lambda: sys.setprofile(None))
    kind, what, *nth = AT.split(":")
    module, _, function = what.rpartition(".")
    left = [int(nth[0]) if nth else 1]

    def fire():
        if os.getpid() != trainer:
            return
        left[0] = 0
        if DO == "PAUSE":
            return pause(AT)
        sys.stderr.write(f"probe: SIG{name} to {target} at {AT}\n")
        if target == "job":
            os.killpg(os.getpgid(0), signum)
        else:
            os.kill(launcher if target == "launcher" else os.getpid(), signum)

    if kind == "import":
        sys.addaudithook(lambda event, args: event == "import" and args[0] == what and left[0] and fire())
    else:
        def on_call(frame, event, arg):
            # A module run with -m is named __main__; its spec keeps the real name.
            name = getattr(frame.f_globals.get("__spec__"), "name", frame.f_globals.get("__name__"))
            if event == "call" and frame.f_code.co_name == function and name == module:
                left[0] -= 1
                if not left[0]:
                    sys.setprofile(None)
                    fire()

        sys.setprofile(on_call)
