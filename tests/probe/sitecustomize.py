"""Imported at start-up by every Python process whose PYTHONPATH holds this folder (tests only).

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
