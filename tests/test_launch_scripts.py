"""The scripts in launch/, as users run them. The CPU ones train in the other tests (conftest.launch_cmd runs
launch/cpu.sh and launch/cpu_multi.sh, test_distributed launch/mixed_precision.sh, test_faults
launch/multi_node.sh, test_slurm launch/slurm.sbatch, test_gpu the GPU ones on a GPU); here every one is
parsed, and the GPU ones run against stand-ins that print what they were given (`accelerate`), list a
machine's GPUs (`nvidia-smi`, `torch.cuda`) or play SLURM (`srun`, `scontrol`), to check the command each builds."""
import os
import textwrap

import pytest

from conftest import REPO, run

SCRIPTS = [*sorted((REPO / "launch").glob("*.sh")), *sorted((REPO / "launch").glob("*.sbatch")),
           REPO / "tests" / "slurm" / "cluster.sh"]
# The user's flags, one of them a value with a space: each must reach the trainer whole, and last.
FLAGS = ["--epochs", "3", "--output-dir", "my runs/a"]
# CUDA's own count on a machine of FAKE_GPUS devices, for `import torch` in the scripts' child processes: the
# devices CUDA_VISIBLE_DEVICES names, in order, up to the first entry that is not one of them (CUDA ignores
# the rest). Indices only; CUDA also takes GPU-/MIG- UUIDs there.
FAKE_TORCH = '''
import os


class cuda:
    @staticmethod
    def device_count():
        n = int(os.environ["FAKE_GPUS"])
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            return n
        count = 0
        for entry in visible.split(","):
            if not entry.strip().isdigit() or int(entry) >= n:
                break
            count += 1
        return count
'''


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_parses(script):
    checked = run(["bash", "-n", str(script)], timeout=30)
    assert checked.returncode == 0, checked.stderr
    assert os.access(script, os.X_OK) or script.suffix == ".sbatch"  # sbatch reads the file, the others run


@pytest.fixture
def stand_ins(tmp_path) -> dict:
    """The environment of a machine with 4 GPUs, all visible: an `accelerate` that prints its arguments one per
    line, `nvidia-smi -L` and a `torch` package (first on PYTHONPATH) that count 4, and SLURM's `srun` (runs its
    command) and `scontrol show hostnames` (the job's two nodes)."""
    bin_dir, py = tmp_path / "bin", tmp_path / "py" / "torch"
    bin_dir.mkdir()
    py.mkdir(parents=True)
    (py / "__init__.py").write_text(textwrap.dedent(FAKE_TORCH))
    (bin_dir / "accelerate").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (bin_dir / "nvidia-smi").write_text('#!/bin/sh\nfor i in 0 1 2 3; do echo "GPU $i: H100"; done\n')
    (bin_dir / "srun").write_text('#!/bin/sh\nexec "$@"\n')
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "node-a\\nnode-b\\n"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(py.parent), "FAKE_GPUS": "4",
            "CUDA_VISIBLE_DEVICES": None, "GPUS_PER_NODE": None, "NPROC": None, "PRECISION": None}


def launched(cmd: list[str], env: dict) -> tuple[dict, list[str]]:
    """What `cmd` gave `accelerate launch`: its options ({"--num_processes": "2", "--multi_gpu": True, ...})
    and the trainer's arguments after `-m mnist_dist.train`."""
    result = run(cmd, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    words = result.stdout.splitlines()
    assert words[0] == "launch", words
    module = words.index("-m")
    assert words[module + 1] == "mnist_dist.train", words
    options, given = {}, words[1:module]
    for i, word in enumerate(given):
        if word.startswith("-"):
            value = given[i + 1] if i + 1 < len(given) and not given[i + 1].startswith("-") else True
            options[word] = value
    return options, words[module + 2:]


def script(name: str) -> list[str]:
    return [str(REPO / "launch" / name), *FLAGS]


@pytest.mark.parametrize("name, env, machines, per_machine", [
    ("gpu.sh", {}, 1, 1),
    ("mixed_precision.sh", {}, 1, 1),
    ("multi_gpu.sh", {}, 1, 4),
    ("multi_gpu.sh", {"NPROC": "3"}, 1, 3),
    ("multi_node.sh", {"MACHINE_RANK": "1", "MAIN_ADDR": "10.0.0.1"}, 2, 4),
    ("multi_node.sh", {"MACHINE_RANK": "0", "MAIN_ADDR": "10.0.0.1", "NUM_MACHINES": "3", "GPUS_PER_NODE": "2"}, 3, 2),
])
def test_the_gpu_scripts_build_the_documented_command(stand_ins, name, env, machines, per_machine):
    """One process per visible GPU (or as asked) on each machine, the precision of PRECISION, the user's flags last
    and whole."""
    options, trainer = launched(script(name), {**stand_ins, **env, "PRECISION": "fp16"})
    assert int(options["--num_processes"]) == machines * per_machine
    assert int(options["--num_machines"]) == machines
    assert options["--mixed_precision"] == "fp16"
    assert trainer == FLAGS
    if machines > 1:
        assert (options["--machine_rank"], options["--main_process_ip"]) == (env["MACHINE_RANK"], "10.0.0.1")


@pytest.mark.parametrize("name, env", [("multi_gpu.sh", {}),
                                       ("multi_node.sh", {"MACHINE_RANK": "0", "MAIN_ADDR": "10.0.0.1"})])
def test_the_gpu_count_follows_cuda_visible_devices(stand_ins, name, env):
    """4 GPUs on the machine, 2 of them visible: 2 processes per machine, not 4 (of which 2 would fail with
    'invalid device ordinal')."""
    options, _ = launched(script(name), {**stand_ins, **env, "CUDA_VISIBLE_DEVICES": "0,1"})
    assert int(options["--num_processes"]) == 2 * int(options["--num_machines"])


def test_mixed_precision_trains_on_the_cpu_when_no_gpu_is_visible(stand_ins):
    options, _ = launched(script("mixed_precision.sh"), {**stand_ins, "CUDA_VISIBLE_DEVICES": ""})
    assert options["--config_file"] == "accelerate_config.yaml" and "--num_processes" not in options


def slurm_job(gpus_on_node: str | None, nodes: int = 1) -> dict:
    """The environment SLURM gives the batch script of job 1234 (on its first node) and each task srun starts."""
    return {"SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "node-[a-b]" if nodes > 1 else "node-a",
            "SLURM_NNODES": str(nodes), "SLURM_NODEID": "0", "SLURM_GPUS_ON_NODE": gpus_on_node}


SBATCH = ["bash", str(REPO / "launch" / "slurm.sbatch"), *FLAGS]  # as sbatch runs it, with the user's flags


@pytest.mark.parametrize("nodes", [1, 2])
def test_slurm_starts_one_process_per_allocated_gpu(stand_ins, nodes):
    """sbatch --gpus-per-node 2: SLURM_GPUS_ON_NODE=2 gives 2 processes per node, whatever the machine has."""
    options, _ = launched(SBATCH, {**stand_ins, **slurm_job("2", nodes)})
    assert int(options["--num_processes"]) == 2 * nodes and int(options["--num_machines"]) == nodes
    assert (options["--machine_rank"], options["--main_process_ip"]) == ("0", "node-a")


def test_slurm_gpus_per_node_overrides_the_allocation(stand_ins):
    """What tests/test_slurm.py relies on: GPUS_PER_NODE=2 on CPU nodes, which SLURM gave no GPUs."""
    options, _ = launched(SBATCH, {**stand_ins, **slurm_job(None), "GPUS_PER_NODE": "2"})
    assert int(options["--num_processes"]) == 2


def test_slurm_without_gpus_says_how_to_ask_for_them(stand_ins):
    result = run(SBATCH, env={**stand_ins, **slurm_job(None)}, timeout=60)
    assert result.returncode != 0 and "--gpus-per-node" in result.stderr, result.stdout + result.stderr


def test_slurm_passes_the_users_flags_whole_and_last(stand_ins):
    options, trainer = launched(SBATCH, {**stand_ins, **slurm_job("2")})
    assert trainer == ["--output-dir", "runs/slurm-1234", "--resume", "auto", *FLAGS]  # the user's --output-dir wins
    assert options["--main_process_port"] == str(20000 + 1234)


def test_multi_node_names_what_it_misses(stand_ins):
    result = run([str(REPO / "launch" / "multi_node.sh")], env={**stand_ins, "MAIN_ADDR": "10.0.0.1"}, timeout=30)
    assert result.returncode != 0 and "set MACHINE_RANK" in result.stderr
