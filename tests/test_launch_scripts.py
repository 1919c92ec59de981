"""The scripts in launch/, as users run them. The CPU ones train in the other tests (conftest.launch_cmd runs
launch/cpu.sh and launch/cpu_multi.sh, test_distributed launch/mixed_precision.sh, test_faults
launch/multi_node.sh, test_slurm launch/slurm.sbatch); the GPU ones are parsed here, and run against stand-ins
for `accelerate` and `nvidia-smi` that print what they were given, to check the command each one builds."""
import os
import shlex

import pytest

from conftest import REPO, run

SCRIPTS = [*sorted((REPO / "launch").glob("*.sh")), REPO / "launch" / "slurm.sbatch", REPO / "tests" / "slurm" / "cluster.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_parses(script):
    checked = run(["bash", "-n", str(script)], timeout=30)
    assert checked.returncode == 0, checked.stderr
    assert os.access(script, os.X_OK) or script.suffix == ".sbatch"  # sbatch reads the file, the others run


@pytest.fixture
def stand_ins(tmp_path) -> dict:
    """PATH with an `accelerate` that prints its arguments, one per line, and an `nvidia-smi -L` of 4 GPUs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "accelerate").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (bin_dir / "nvidia-smi").write_text('#!/bin/sh\nfor i in 0 1 2 3; do echo "GPU $i: H100"; done\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def launched(script: str, env: dict) -> str:
    """The `accelerate` command line the script runs, as one shell-quoted string."""
    result = run([str(REPO / "launch" / script), "--epochs", "3"], env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    return shlex.join(result.stdout.splitlines())


@pytest.mark.parametrize("script, env, expected", [
    ("gpu.sh", {"PRECISION": "bf16"}, "launch -q --num_processes 1 --num_machines 1 --mixed_precision bf16 "
     "--dynamo_backend no -m mnist_dist.train --epochs 3"),
    ("multi_gpu.sh", {}, "launch --multi_gpu --num_processes 4 --num_machines 1 --mixed_precision no "
     "--dynamo_backend no -m mnist_dist.train --epochs 3"),
    ("mixed_precision.sh", {"PRECISION": "fp16"}, "launch -q --num_processes 1 --num_machines 1 --dynamo_backend no "
     "--mixed_precision fp16 -m mnist_dist.train --epochs 3"),
    ("multi_node.sh", {"MACHINE_RANK": "1", "MAIN_ADDR": "10.0.0.1"}, "launch --multi_gpu --num_machines 2 "
     "--machine_rank 1 --main_process_ip 10.0.0.1 --main_process_port 29500 --num_processes 8 --mixed_precision no "
     "--dynamo_backend no -m mnist_dist.train --epochs 3"),
])
def test_the_gpu_scripts_build_the_documented_command(stand_ins, script, env, expected):
    assert launched(script, {**stand_ins, **env}) == expected


def test_multi_node_names_what_it_misses(stand_ins):
    result = run([str(REPO / "launch" / "multi_node.sh")], env={**stand_ins, "MAIN_ADDR": "10.0.0.1"}, timeout=30)
    assert result.returncode != 0 and "set MACHINE_RANK" in result.stderr
