import dataclasses
import sys

import pytest

from mnist_dist.settings import Settings, build_parser, parse_args

from conftest import run


def test_every_setting_is_a_flag_with_its_default():
    parsed = parse_args([])
    assert parsed == Settings()
    options = build_parser().format_help()
    for f in dataclasses.fields(Settings):
        assert "--" + f.name.replace("_", "-") in options


def test_flags_reach_the_settings_in_either_spelling():
    s = parse_args(["--target-acc", "98.5", "--batch_size", "64", "--no-channels-last", "--loader", "torchvision"])
    assert (s.target_acc, s.batch_size, s.channels_last, s.loader) == (98.5, 64, False, "torchvision")


@pytest.mark.parametrize("args, says", [
    (["--epochs", "0"], "--epochs"),
    (["--target-acc", "101"], "--target-acc"),
    (["--lr", "-0.1"], "--lr"),
    (["--mixed_precision", "fp17"], "mixed_precision"),
    (["--loader", "pandas"], "loader"),
    (["--epoch", "3x"], "--epoch"),
    (["--no-such-flag"], "--no-such-flag"),
])
def test_an_invalid_command_line_is_argparses_usage_error(args, says, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_args(args)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "error:" in err


@pytest.mark.parametrize("args, code", [(["--epochs", "0"], 2), (["--help"], 0)])
def test_the_program_answers_a_bad_value_or_help_before_it_imports_torch(args, code):
    """Before the imports that take seconds: -X importtime lists every module the program imported."""
    result = run([sys.executable, "-X", "importtime", "-m", "mnist_dist.train", *args], timeout=60)
    assert result.returncode == code, result.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "mnist_dist.settings" in imported and "torch" not in imported and "accelerate" not in imported
    if code:
        assert "--epochs must be at least 1" in result.stderr and "Traceback" not in result.stderr
    else:
        assert "--target-acc" in result.stdout
