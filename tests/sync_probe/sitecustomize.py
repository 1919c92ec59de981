"""Imported at start-up by every Python process whose PYTHONPATH holds this folder (tests only).

SYNC_COUNT=DIR: each process counts the calls that would make the host wait for a GPU, and at exit writes
them to DIR/<pid>.json with its command line. On the CPU nothing waits, so they are counted by kind:
tensors made from Python data (`aten.lift_fresh`: torch.tensor, as_tensor of a list, new_tensor; on a GPU a
copy from pageable memory), `.item()` and friends (`aten._local_scalar_dense`), and `Tensor.tolist`, `.cpu`,
`.numpy`, wrapped here because a CPU tensor answers them without dispatching an op.
"""
import os

DIR = os.environ.get("SYNC_COUNT")
if DIR:
    import atexit
    import json
    import sys
    from collections import Counter

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = Counter()
    WATCHED = {torch.ops.aten.lift_fresh.default: "lift_fresh",
               torch.ops.aten._local_scalar_dense.default: "item"}

    class CountSyncs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in WATCHED:
                counts[WATCHED[func]] += 1
            return func(*args, **(kwargs or {}))

    def counted(name):
        method = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return method(self, *args, **kwargs)
        return wrapper

    for name in ("tolist", "cpu", "numpy"):
        setattr(torch.Tensor, name, counted(name))
    CountSyncs().__enter__()  # for the whole process, on its main thread, where training runs

    @atexit.register
    def write():
        with open(os.path.join(DIR, f"{os.getpid()}.json"), "w") as f:
            json.dump({"argv": sys.argv, "counts": counts}, f)
