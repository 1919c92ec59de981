"""Checkpoints that survive the crash they exist for (issue 33): flushed before they are published, verified before
they are restored, a torn one passed over for the newest intact one, and "newest" meaning saved last.

A crash is simulated as the issue's notes say: by cutting a file of a saved checkpoint short (to 0 bytes or half),
as a power loss can leave a renamed folder whose data never reached the disk. Every run is the real program."""
import re
import shutil
import sys
from pathlib import Path

import pytest

from conftest import POLL, REPO, at, launch, read_metrics, run

FSYNC_PROBE = str(REPO / "tests" / "fsync_probe")  # PYTHONPATH for tests/fsync_probe/sitecustomize.py
TIMING = {"seconds", "train_seconds", "elapsed"}
FLAGS = ["--train-limit", "640", "--test-limit", "200", "--target-acc", "100", "--report-to", "none"]


def train(*args, env=None):
    return run([sys.executable, "-m", "mnist_dist.train", *args], timeout=300, env=env)


def cut(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def epochs(out: Path) -> list[int]:
    return [e["epoch"] for e in read_metrics(out)["epochs"]]


def kept(out: Path, pattern: str = "epoch_*") -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob(pattern))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, mnist_root):
    """A finished 2-epoch run on one process, keeping epoch_0001 and epoch_0002: each test continues a copy."""
    out = tmp_path_factory.mktemp("finished") / "run"
    done = train(*FLAGS, "--epochs", "2", "--data-dir", str(mnist_root), "--output-dir", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def finished2(tmp_path_factory, mnist_root):
    """The same on two processes, with every os.fsync and rename of each process recorded
    (tests/fsync_probe)."""
    base = tmp_path_factory.mktemp("finished2")
    out, log = base / "run", base / "fsync"
    log.mkdir()
    done = launch([*FLAGS, "--epochs", "2", "--data-dir", str(mnist_root), "--output-dir", str(out)], processes=2,
                  env={"PYTHONPATH": FSYNC_PROBE, "FSYNC_LOG": str(log)})
    assert done.returncode == 0, done.stderr[-3000:]
    return out, log


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    return out


def events(log: Path, rank: int) -> list[tuple[int, str, list[str]]]:
    lines = (log / f"rank{rank}.log").read_text().splitlines()
    return [(int(t), what, rest) for t, what, *rest in (line.split(" ") for line in lines)]


def test_a_save_flushes_each_file_then_its_manifest_renames_and_flushes_the_folder(finished2):
    """Two processes: rank 1 flushes its RNG state itself (on several machines the main process could not), before
    the main process publishes; the main process flushes every file, then the manifest, then the folder, renames
    it into place and flushes checkpoints/. The run's own files are flushed before their rename too."""
    out, log = finished2
    rank0, rank1 = events(log, 0), events(log, 1)
    for name in ("epoch_0001", "epoch_0002"):
        folder, partial = out / "checkpoints" / name, str(out / "checkpoints" / f".partial-{name}")
        [(renamed, i)] = [(t, i) for i, (t, what, args) in enumerate(rank0)
                          if what == "rename" and args == [partial, str(folder)]]
        flushed = {args[0]: (t, j) for j, (t, what, args) in enumerate(rank0) if what == "fsync"}
        files = sorted(p.name for p in folder.iterdir())
        for f in files:  # every file, flushed before the rename
            assert f"{partial}/{f}" in flushed and flushed[f"{partial}/{f}"][1] < i, (name, f)
        assert {"manifest.json", "model.safetensors", "random_states_0.pkl", "random_states_1.pkl"} <= set(files)
        manifest = flushed[f"{partial}/manifest.json"][1]
        assert all(flushed[f"{partial}/{f}"][1] < manifest for f in files if f != "manifest.json")  # the manifest last
        assert manifest < flushed[partial][1] < i  # then the folder's entries, then the rename
        then = next((j for j, (_, what, _) in enumerate(rank0) if j > i and what == "rename"), len(rank0))
        assert any(what == "fsync" and args == [str(out / "checkpoints")] for _, what, args in rank0[i:then]), name
        own = [t for t, what, args in rank1 if what == "fsync" and args == [f"{partial}/random_states_1.pkl"]]
        assert own and own[0] < renamed, name  # rank 1's own file, before the main process published
    for final in ("model.safetensors", "metrics.json", "config.json"):  # rundir.write_atomic's temporary names
        stem, suffix = final.split(".")
        assert any(what == "fsync" and re.fullmatch(rf"\.{stem}\.tmp-\d+\.{suffix}", Path(args[0]).name)
                   for _, what, args in rank0), final


@pytest.mark.parametrize("size, resume", [("0", "auto"), ("half", "auto"), ("half", "run folder"), ("0", "requeue")])
def test_a_torn_newest_checkpoint_is_passed_over_for_the_newest_intact_one(finished, tmp_path, mnist_root, size,
                                                                           resume):
    """`--resume auto` continues epoch_0001 when epoch_0002's weights were cut short, and so do `--resume RUN_FOLDER`
    and a SLURM requeue of the plain command (SLURM_RESTART_COUNT, as a torchrun restart's count): exit 0, one
    continuous history, one line naming both, and the torn checkpoint set aside, not deleted."""
    out = copy_of(finished, tmp_path)
    weights = out / "checkpoints" / "epoch_0002" / "model.safetensors"
    whole = weights.stat().st_size
    cut(weights, 0 if size == "0" else whole // 2)
    how = {"auto": ["--resume", "auto", "--output-dir", str(out)], "run folder": ["--resume", str(out)],
           "requeue": ["--output-dir", str(out)]}[resume]
    resumed = train(*FLAGS, "--epochs", "3", "--data-dir", str(mnist_root), *how,
                    env={"SLURM_RESTART_COUNT": "1"} if resume == "requeue" else None)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    torn, intact, aside = out / "checkpoints" / "epoch_0002", out / "checkpoints" / "epoch_0001", \
        out / "checkpoints" / "torn-epoch_0002"
    said = [line for line in resumed.stderr.splitlines() if "torn" in line]
    now = whole // 2 if size == "half" else 0
    assert said == [f"mnist_dist: checkpoint '{torn}' is torn (model.safetensors is {now:,} "
                    f"bytes, its manifest says {whole:,}); continuing from '{intact}' instead; '{torn}' moved to "
                    f"'{aside}'"], resumed.stderr[-3000:]
    assert f"resumed from {intact} after epoch 1" in resumed.stdout and "Traceback" not in resumed.stderr
    assert epochs(out) == [1, 2, 3] and [e["train_images"] for e in read_metrics(out)["epochs"]] == [640] * 3
    timeless = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert timeless(read_metrics(out)["epochs"][:2]) == timeless(read_metrics(finished)["epochs"])  # as it was
    assert (aside / "model.safetensors").stat().st_size == now  # kept as it was
    assert kept(out) == ["epoch_0002", "epoch_0003"] and kept(out, "torn-*") == ["torn-epoch_0002"]


def test_two_processes_agree_to_pass_over_a_checkpoint_whose_rank_1_file_is_torn(finished2, tmp_path, mnist_root):
    """Rank 1's RNG state cut to half: the main process's verdict is every rank's; both continue epoch_0001."""
    out = copy_of(finished2[0], tmp_path)
    cut(out / "checkpoints" / "epoch_0002" / "random_states_1.pkl",
        (out / "checkpoints" / "epoch_0002" / "random_states_1.pkl").stat().st_size // 2)
    resumed = launch([*FLAGS, "--epochs", "3", "--data-dir", str(mnist_root), "--output-dir", str(out),
                      "--resume", "auto"], processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert output.count("is torn (random_states_1.pkl is") == 1 and output.count("continuing from") == 1, output[-3000:]
    assert f"continuing from '{out / 'checkpoints' / 'epoch_0001'}' instead" in output
    assert epochs(out) == [1, 2, 3] and kept(out, "torn-*") == ["torn-epoch_0002"]


def test_a_torn_checkpoint_named_explicitly_is_an_error_whose_advice_works(finished, tmp_path, mnist_root):
    out = copy_of(finished, tmp_path)
    torn = out / "checkpoints" / "epoch_0002"
    cut(torn / "optimizer.bin", (torn / "optimizer.bin").stat().st_size // 2)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    command = [*FLAGS, "--epochs", "3", "--data-dir", str(mnist_root), "--resume", str(torn)]
    refused = train(*command)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert f"the checkpoint '{torn}' is torn (optimizer.bin is" in refused.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written, nothing moved
    [(new, old)] = re.findall(r"continue with the same command, --resume (\S+) in place of --resume (\S+)\.$",
                              refused.stderr.strip(), re.M)
    assert old == str(torn) and new == str(out / "checkpoints" / "epoch_0001")
    followed = train(*[new if a == old else a for a in command])  # to the letter
    assert followed.returncode == 0, followed.stderr[-3000:]
    assert f"resumed from {new} after epoch 1" in followed.stdout and epochs(out) == [1, 2, 3]
    # Its first save set the torn one aside: never continued, never deleted.
    assert f"mnist_dist: set aside '{torn}' (torn: optimizer.bin is" in followed.stderr
    assert kept(out) == ["epoch_0002", "epoch_0003"] and kept(out, "torn-*") == ["torn-epoch_0002"]


def test_a_run_continues_the_branch_saved_last_not_the_highest_name(tmp_path, mnist_root):
    """The issue's sequence: preempted 30 steps into epoch 3; resumed from epoch_0002 by hand and preempted 10
    steps in; then `--resume auto` (a requeue) continues epoch_0002_step_00010, saved last, and not the
    abandoned epoch_0002_step_00030, and retention kept the branch's parent."""
    out = tmp_path / "run"
    flags = ["--train-limit", "3200", "--test-limit", "200", "--target-acc", "100", "--report-to", "none",
             "--epochs", "3", "--data-dir", str(mnist_root)]  # 50 steps an epoch: 5 polls each
    first = train(*flags, "--output-dir", str(out), env=at(f"{POLL}:13", "TERM>self"))  # epoch 3, step 30
    assert first.returncode == 143, first.stderr[-3000:]
    assert kept(out) == ["epoch_0002", "epoch_0002_step_00030"]
    again = train(*flags, "--resume", str(out / "checkpoints" / "epoch_0002"), env=at(f"{POLL}:1", "TERM>self"))
    assert again.returncode == 143, again.stderr[-3000:]
    assert kept(out) == ["epoch_0002", "epoch_0002_step_00010"]  # the branch and its parent
    assert kept(out, "abandoned-*") == ["abandoned-epoch_0002_step_00030"]  # set aside, not deleted
    last = train(*flags, "--resume", "auto", "--output-dir", str(out))
    assert last.returncode == 0, last.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'epoch_0002_step_00010'} after epoch 2, step 10" in last.stdout
    m = read_metrics(out)
    assert epochs(out) == [1, 2, 3] and [e["train_images"] for e in m["epochs"]] == [3200] * 3


def test_with_no_intact_checkpoint_resume_auto_starts_anew_and_says_why(finished, tmp_path, mnist_root):
    """Plain `--resume` is then an error, whose advice, followed to the letter, is `--resume auto`: it starts the
    run anew in its folder, saying why in one line, and its first save sets the torn checkpoints aside."""
    out = copy_of(finished, tmp_path)
    cut(out / "checkpoints" / "epoch_0002" / "model.safetensors", 0)
    (out / "checkpoints" / "epoch_0001" / "manifest.json").unlink(missing_ok=True)  # as one saved before manifests
    command = [*FLAGS, "--epochs", "2", "--data-dir", str(mnist_root), "--output-dir", str(out), "--resume"]
    refused = train(*command)
    assert refused.returncode == 2 and "--resume found no intact checkpoint in" in refused.stderr, refused.stderr
    [advice] = re.findall(r"use the same command with (--resume auto --output-dir \S+) in place of --resume \(",
                          refused.stderr)
    assert advice == f"--resume auto --output-dir {out}"
    started = train(*command[:-1], *advice.split())
    assert started.returncode == 0, started.stderr[-3000:]
    [said] = [line for line in started.stderr.splitlines() if line.startswith("mnist_dist:")]
    # The one without a manifest is named first: nothing shows it was saved before the other.
    assert said == (f"mnist_dist: no intact checkpoint to continue in '{out / 'checkpoints'}': "
                    f"'{out / 'checkpoints' / 'epoch_0001'}' is torn (no manifest.json, so not known to be complete: "
                    "saved by an mnist_dist from before checkpoints were verified, or not by a whole save; 1 more "
                    "torn); starting the run anew, and its first checkpoint sets the torn one(s) aside as torn-*")
    assert "resumed from" not in started.stdout and epochs(out) == [1, 2]
    assert kept(out) == ["epoch_0001", "epoch_0002"] and kept(out, "torn-*") == ["torn-epoch_0001", "torn-epoch_0002"]


def test_a_checkpoint_without_a_manifest_named_explicitly_is_refused_until_sealed(finished, tmp_path, mnist_root):
    """One saved before checkpoints had manifests is not known to be complete: refused, saying why and how to vouch
    for it; `python -m mnist_dist.manifest seal` checks its files' CRCs and lengths, and the resume then works."""
    out = copy_of(finished, tmp_path)
    old = out / "checkpoints" / "epoch_0002"
    (old / "manifest.json").unlink(missing_ok=True)  # as one saved before manifests
    command = [*FLAGS, "--epochs", "3", "--data-dir", str(mnist_root), "--resume", str(old)]
    refused = train(*command)
    assert refused.returncode == 2 and "no manifest.json, so not known to be complete" in refused.stderr
    [seal] = re.findall(r"`(python -m mnist_dist\.manifest seal \S+)`", refused.stderr)
    sealed = run([sys.executable, *seal.split()[1:]], timeout=120)
    assert sealed.returncode == 0, sealed.stderr
    resumed = train(*command)
    assert resumed.returncode == 0 and f"resumed from {old} after epoch 2" in resumed.stdout, resumed.stderr[-3000:]
    assert epochs(out) == [1, 2, 3]


def test_seal_refuses_a_checkpoint_cut_short(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    old = out / "checkpoints" / "epoch_0002"
    (old / "manifest.json").unlink(missing_ok=True)  # as one saved before manifests
    cut(old / "optimizer.bin", (old / "optimizer.bin").stat().st_size // 2)
    sealed = run([sys.executable, "-m", "mnist_dist.manifest", "seal", str(old)], timeout=120)
    assert sealed.returncode == 2 and f"'{old / 'optimizer.bin'}' cannot be read" in sealed.stderr, sealed.stderr
    assert not (old / "manifest.json").exists()
