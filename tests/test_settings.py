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


def test_the_program_exits_on_an_invalid_value_with_a_message_not_a_traceback():
    result = run([sys.executable, "-m", "mnist_dist.train", "--epochs", "0"], timeout=60)
    assert result.returncode == 2
    assert "--epochs must be at least 1" in result.stderr and "Traceback" not in result.stderr
