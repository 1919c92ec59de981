"""Imported at start-up by every Python process whose PYTHONPATH holds this folder (tests only): what the
programs do, seen from inside, and faults triggered by the run reaching a named step, never by the clock.

PROBE_LOG=DIR: each process appends what it writes (opens for writing, folders made, renames,
links) to DIR/rank<RANK>.log, one path per line, through Python's audit hooks.
PROBE_DTYPES=1 (with PROBE_LOG): also the output dtype and batch size of every Conv2d forward in training.
PROBE_AT=WHEN and PROBE_DO=SIGNAL>TARGET: a fault, once, in the trainer of rank PROBE_RANK (default 0) of
the job's first start (never in a launcher, nor in a group that torchrun restarted). WHEN is "import:MODULE"
(that import begins) or "call:MODULE.FUNCTION[:N]" (the N-th call of that Python function in the main
thread: mnist_dist.train.poll runs every 10 steps, accelerate.accelerator.save_state at each checkpoint). SIGNAL is KILL, TERM or INT; TARGET is
self, launcher (the trainer's parent) or job (every process of the job's process group: launcher, trainers,
DataLoader workers, as a scheduler's scancel signals them).
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


AT, DO = os.environ.get("PROBE_AT"), os.environ.get("PROBE_DO")
if AT and DO and is_trainer(sys.orig_argv) and os.environ.get("RANK", "0") == os.environ.get("PROBE_RANK", "0") \
        and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    import signal

    name, target = DO.split(">")
    signum, launcher, trainer = getattr(signal, f"SIG{name}"), os.getppid(), os.getpid()
    # Forked children (DataLoader workers) inherit the hooks below: they must not fire there.
    os.register_at_fork(after_in_child=lambda: sys.setprofile(None))
    kind, what, *nth = AT.split(":")
    module, _, function = what.rpartition(".")
    left = [int(nth[0]) if nth else 1]

    def fire():
        if os.getpid() != trainer:
            return
        left[0] = 0
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
