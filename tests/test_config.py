"""--config (replaying a run's config.json) and --report-to (which trackers), without training."""
import dataclasses
import json
import sys

import pytest
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType

from mnist_dist.errors import RunError
from mnist_dist.settings import Settings, parse_args, trackers

from conftest import run

INSTALLED = [str(t) for t in get_available_trackers()]


def write_config(path, settings: Settings):
    """A config.json as train.py writes it: the settings, then what the run resolved and where it ran."""
    info = {**dataclasses.asdict(settings), "output_dir": "runs/old", "world_size": 2, "global_batch": 128,
            "mixed_precision": "bf16", "distributed_type": "MULTI_CPU", "device": "cpu", "threads": 1,
            "versions": {"python": "3.11.7", "torch": "2.13.0"}}
    path.write_text(json.dumps(info, indent=2))
    return path


def test_a_runs_config_replays_its_settings_in_a_new_run_folder(tmp_path):
    old = Settings(epochs=7, target_acc=99.0, lr=0.02, loader="torchvision", channels_last=False,
                   report_to="none", output_dir="runs/old", resume="latest")
    path = write_config(tmp_path / "config.json", old)
    replay = parse_args(["--config", str(path)])
    # The resolved precision is replayed; the old run folder and its resumption are not.
    assert replay == dataclasses.replace(old, mixed_precision="bf16", output_dir="", resume="", config=str(path))


def test_flags_on_the_command_line_override_the_file_wherever_they_stand(tmp_path):
    path = write_config(tmp_path / "config.json", Settings(epochs=7, lr=0.02))
    assert parse_args(["--config", str(path), "--epochs", "3"]).epochs == 3
    assert parse_args(["--epochs", "3", "--config", str(path)]).epochs == 3
    assert parse_args(["--config", str(path), "--output-dir", "runs/new"]).output_dir == "runs/new"
    assert parse_args(["--config", str(path)]).lr == 0.02


def test_keys_that_are_not_replayed_are_named_once_by_rank_0(tmp_path, capsys, monkeypatch):
    path = write_config(tmp_path / "config.json", Settings())
    monkeypatch.delenv("RANK", raising=False)
    parse_args(["--config", str(path)])
    note = capsys.readouterr().err
    assert note.count("note:") == 1
    for key in ("world_size", "global_batch", "distributed_type", "device", "versions", "threads",
                "output_dir", "resume", "config"):
        assert key in note
    monkeypatch.setenv("RANK", "1")
    parse_args(["--config", str(path)])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("content, says", [
    ({"epochs": 5, "no_such_setting": 1}, "'no_such_setting' is not a setting"),
    ({"epochs": "five"}, "'epochs' is \"five\"; expected int"),
    ({"epochs": 5.0}, "'epochs' is 5.0; expected int"),
    ({"epochs": True}, "'epochs' is true; expected int"),
    ({"channels_last": 1}, "'channels_last' is 1; expected bool"),
    ({"lr": "0.1"}, "'lr' is \"0.1\"; expected float"),
    ({"loader": "pandas"}, "'loader' is \"pandas\"; expected ['tensor', 'torchvision']"),
    ({"epochs": 0}, "--epochs must be at least 1"),
    ([1, 2], "expected a JSON object"),
    ("{not json", "Expecting"),
])
def test_a_bad_config_is_argparses_usage_error(tmp_path, capsys, content, says):
    path = tmp_path / "config.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(SystemExit) as exit:
        parse_args(["--config", str(path)])
    assert exit.value.code == 2
    assert says in capsys.readouterr().err


def test_a_missing_config_file_is_named(capsys):
    with pytest.raises(SystemExit) as exit:
        parse_args(["--config", "no/such/config.json"])
    assert exit.value.code == 2 and "--config no/such/config.json: " in capsys.readouterr().err


def test_a_bad_config_stops_the_program_with_one_message_not_a_traceback(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"epochs": "five"}))
    result = run([sys.executable, "-m", "mnist_dist.train", "--config", str(path)], timeout=60)
    assert result.returncode == 2
    assert "error: --config" in result.stderr and "'epochs'" in result.stderr
    assert "Traceback" not in result.stderr


def test_report_to_names_what_accelerator_log_with_takes():
    assert trackers("tensorboard") == ["tensorboard"]
    assert trackers("none") == []
    assert trackers("all") == INSTALLED
    assert trackers(" tensorboard,tensorboard ") == ["tensorboard"]
    assert trackers(",".join(reversed(INSTALLED))) == INSTALLED[::-1]
    assert parse_args([]).report_to == "tensorboard"


@pytest.mark.parametrize("value", ["tensorbored", "all,tensorboard", "none,tensorboard"])
def test_report_to_refuses_a_name_accelerate_does_not_know(value):
    with pytest.raises(RunError, match="unknown tracker .* choose from .*tensorboard"):
        trackers(value)


def test_report_to_refuses_a_tracker_that_is_not_installed_with_the_pip_line(capsys):
    missing = [n for n in LoggerType.list() if n != "all" and n not in INSTALLED]
    if not missing:
        pytest.skip("every tracker Accelerate knows is installed")
    name = missing[0]
    with pytest.raises(RunError) as err:
        trackers(f"tensorboard,{name}")
    message = str(err.value)
    assert "\n" not in message and f"the {name} package is not installed" in message and "pip install " in message
    # Through the command line: argparse's error, before anything is written.
    with pytest.raises(SystemExit) as exit:
        parse_args(["--report-to", name])
    assert exit.value.code == 2 and message in capsys.readouterr().err
