"""The two ways a run ends early on purpose: an error the user can fix, and a stop that a signal asked for."""


class RunError(RuntimeError):
    """A problem the user can fix: printed as one paragraph, without a traceback (exit status 2)."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the run stopped after a step and saved a checkpoint. Args: (signum, folder)."""
