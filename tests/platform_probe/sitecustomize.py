"""Imported at start-up by every Python process whose PYTHONPATH holds this folder (tests only). On Linux, it
takes away what another system lacks, before the program imports anything, so that the test runs the program
as a user there would, as far as the Linux-only calls go.

PLATFORM_PROBE=macos: no os.sched_getaffinity, no glibc (platform.libc_ver() finds none, libc.so.6 does not load).
PLATFORM_PROBE=windows: the same, and no fcntl module.
PLATFORM_PROBE_LOG=FILE: the probe's name, then every library name given to ctypes.CDLL, one a line.
"""
import ctypes
import os
import platform
import sys

PROBE = os.environ.get("PLATFORM_PROBE")
if PROBE in ("macos", "windows"):
    log = open(os.environ["PLATFORM_PROBE_LOG"], "a", buffering=1)
    log.write(f"{PROBE}\n")
    del os.sched_getaffinity
    platform.libc_ver = lambda *args, **kwargs: ("", "")

    class CDLL(ctypes.CDLL):
        def __init__(self, name, *args, **kwargs):
            log.write(f"{name}\n")
            if name == "libc.so.6":
                raise OSError(f"{name}: cannot open shared object file: No such file or directory")
            super().__init__(name, *args, **kwargs)

    ctypes.CDLL = CDLL
if PROBE == "windows":
    sys.modules["fcntl"] = None  # `import fcntl` raises ImportError
