"""Imported at start-up by every Python process whose PYTHONPATH holds this folder (tests only): the flushes a
run makes, seen from inside. FSYNC_LOG=DIR: each process appends to DIR/rank<RANK>.log, one line per event,
`<CLOCK_MONOTONIC ns> fsync PATH` for every os.fsync (the path its descriptor names) and
`<ns> rename SRC DST` for every os.rename and os.replace, so that the order of a save can be read back, also
across the processes of a job (the clock is the machine's)."""
import os
import sys
import time

LOG = os.environ.get("FSYNC_LOG")
if LOG:
    out = open(os.path.join(LOG, f"rank{os.environ.get('RANK', '0')}.log"), "a", buffering=1)
    fsync = os.fsync

    def logged_fsync(fd):
        fsync(fd)
        try:
            path = os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")
        except OSError:
            path = "?"
        out.write(f"{time.monotonic_ns()} fsync {path}\n")

    os.fsync = logged_fsync

    def audit(event, args):
        if event == "os.rename":
            out.write(f"{time.monotonic_ns()} rename {os.fsdecode(args[0])} {os.fsdecode(args[1])}\n")

    sys.addaudithook(audit)
