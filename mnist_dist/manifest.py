"""What a checkpoint holds, and whether it is whole: its manifest, written last, with each file's size and sha256.

    python -m mnist_dist.manifest seal RUN/checkpoints/epoch_0003   # vouch for one saved before manifests

A checkpoint without a readable manifest, or whose files do not match it, is torn: it is never continued.
"""
import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path

from mnist_dist.rundir import flush_file, flush_folder, write_atomic

PROGRESS = "custom_checkpoint_0.pkl"  # where Accelerate saves the first registered object: the loop's Progress
MANIFEST = "manifest.json"  # written last: what the checkpoint holds, and when it was saved
FORMAT = 1  # the manifest's layout
NO_MANIFEST = (f"no {MANIFEST}, so not known to be complete: saved by an mnist_dist from before checkpoints were "
               "verified, or not by a whole save")


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def manifest(folder: Path) -> dict | None:
    """The checkpoint's manifest, or None where it has none that can be read. Says nothing of its files."""
    try:
        m = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(m, dict) and m.get("format") == FORMAT and isinstance(m.get("save"), int) \
        and isinstance(m.get("files"), dict)
    return m if ok else None


def verify(folder: Path) -> str | None:
    """Why `folder` is not an intact checkpoint (torn), or None when it is: its manifest lists each file with its
    size and sha256, and every file is there and matches."""
    if not (folder / MANIFEST).exists():
        return NO_MANIFEST
    m = manifest(folder)
    if m is None:
        return f"its {MANIFEST} cannot be read"
    for rel, want in m["files"].items():
        path = folder / rel
        try:
            size = path.stat().st_size
            if size != want["size"]:
                return f"{rel} is {size:,} bytes, its manifest says {want['size']:,}"
            if _digest(path) != want["sha256"]:
                return f"{rel} does not match the sha256 in its manifest"
        except FileNotFoundError:
            return f"{rel} is missing"
        except OSError as err:
            return f"{rel} cannot be read ({err.strerror})"
        except (KeyError, TypeError):
            return f"its {MANIFEST} cannot be read"
    return None


def next_save(run_dir: Path, parent: int = 0) -> int:
    """A save counter above every one this run folder has used, its set-aside checkpoints' included."""
    saves = [m["save"] for f in run_dir.glob("checkpoints/*") if f.is_dir() and (m := manifest(f))]
    return max([parent, *saves]) + 1


def record(folder: Path, entry: dict, published: bool) -> None:
    """Flush every file of `folder` and record them in its manifest, written last and flushed with the folder."""
    files = {}
    for path in _files(folder):
        flush_file(path)
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": _digest(path)}
    text = json.dumps({"format": FORMAT, **entry, "files": files}, indent=1)
    if published:  # in place: the old manifest or the whole new one
        write_atomic(folder / MANIFEST, lambda p: p.write_text(text))
        return
    with open(folder / MANIFEST, "w") as f:  # unpublished: nothing reads it before the rename
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    flush_folder(folder)


def seal(folder: Path) -> str | None:
    """Record the manifest of a checkpoint that has none, saved before checkpoints had manifests, after checking
    what can be checked without one: every torch file's CRCs, every safetensors file's header and length.
    Returns why it cannot be sealed, or None once it is."""
    folder = Path(folder)
    if manifest(folder):
        return f"'{folder}' already has a {MANIFEST}" + (f" and is torn ({why})" if (why := verify(folder)) else "")
    if not (folder / PROGRESS).is_file():
        return f"'{folder}' is not an mnist_dist checkpoint (no {PROGRESS})"
    for path in _files(folder):
        if why := _damaged(path):
            return f"'{path}' {why}: '{folder}' is torn"
    run_dir = folder.parent.parent
    record(folder, {"save": next_save(run_dir), "parent": None, "name": folder.name, "sealed": True}, published=True)
    return None


def _damaged(path: Path) -> str | None:
    try:
        if path.suffix == ".safetensors":
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
            whole = path.stat().st_size == 8 + size + max(ends, default=0)
            return None if whole else "is not the length its header says"
        with zipfile.ZipFile(path) as z:
            return None if z.testzip() is None else "fails its CRC check"
    except (OSError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile) as err:
        return f"cannot be read ({type(err).__name__})"


def main(argv: list[str] | None = None) -> int:
    """`python -m mnist_dist.manifest seal FOLDER...`: vouch for checkpoints saved before they had manifests."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] != "seal":
        print("usage: python -m mnist_dist.manifest seal RUN/checkpoints/epoch_NNNN ...", file=sys.stderr)
        return 2
    code = 0
    for folder in args[1:]:
        if why := seal(Path(folder)):
            print(f"mnist_dist: error: {why}", file=sys.stderr)
            code = 2
        else:
            print(f"sealed '{folder}': its {MANIFEST} records its files; --resume {folder} continues it")
    return code


if __name__ == "__main__":
    sys.exit(main())
