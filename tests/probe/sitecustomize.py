"""Imported at start-up by every Python process whose PYTHONPATH holds this folder (tests only): what the
programs do, seen from inside, and faults triggered by the run reaching a named step.

PROBE_LOG=DIR: each process appends what it writes (opens for writing, folders made, renames,
links) to DIR/rank<RANK>.log, one path per line, through Python's audit hooks.
PROBE_DTYPES=1 (with PROBE_LOG): also the output dtype and batch size of every Conv2d forward in training.
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

# PROBE_KILL_LAUNCHER=WHEN: the trainer of rank 0 (never the launcher itself) kills its launcher with SIGKILL,
# as the OOM killer or `kill -9` would, when the run reaches WHEN: "import:MODULE" (that import begins) or
# "call:FUNCTION[:N]" (the N-th call of a Python function of that name, in the main thread).
KILL = os.environ.get("PROBE_KILL_LAUNCHER")
LAUNCHED = {"ACCELERATE_DYNAMO_BACKEND", "TORCHELASTIC_RUN_ID"} & os.environ.keys()
if KILL and LAUNCHED and os.environ.get("RANK", "0") == "0":
    import signal

    launcher = os.getppid()
    kind, name, *nth = KILL.split(":")
    left = [int(nth[0]) if nth else 1]

    def kill_launcher():
        left[0] = 0
        sys.stderr.write(f"probe: killing the launcher (PID {launcher}) at {KILL}\n")
        os.kill(launcher, signal.SIGKILL)

    if kind == "import":
        sys.addaudithook(lambda event, args: event == "import" and args[0] == name and left[0] and kill_launcher())
    else:
        def on_call(frame, event, arg):
            if event == "call" and frame.f_code.co_name == name:
                left[0] -= 1
                if not left[0]:
                    sys.setprofile(None)
                    kill_launcher()

        sys.setprofile(on_call)
