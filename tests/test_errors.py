"""Bad input gets one clear paragraph and a non-zero status, never a traceback, and overwrites nothing."""
import gzip
import sys

from mnist_dist.data import RESOURCES

from conftest import run


def train(*args):
    result = run([sys.executable, "-m", "mnist_dist.train", *args], timeout=300)
    assert "Traceback" not in result.stderr
    return result


def test_corrupt_data_files(tmp_path):
    for name, _ in RESOURCES:
        (tmp_path / name).write_bytes(gzip.compress(b"not mnist"))
    result = train("--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "r"))
    assert result.returncode == 2 and "corrupt" in result.stderr and "delete it" in result.stderr


def test_output_folder_that_cannot_be_written(tmp_path, mnist_root):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = train("--data-dir", str(mnist_root), "--output-dir", str(blocker / "run"))
    assert result.returncode == 2 and "cannot write the run folder" in result.stderr


def test_resume_from_something_that_is_not_a_checkpoint(tmp_path, mnist_root):
    (tmp_path / "junk").mkdir()
    result = train("--data-dir", str(mnist_root), "--output-dir", str(tmp_path / "r"), "--resume", str(tmp_path / "junk"))
    assert result.returncode == 2 and "is not an mnist_dist checkpoint" in result.stderr
    result = train("--data-dir", str(mnist_root), "--output-dir", str(tmp_path / "r2"), "--resume")
    assert result.returncode == 2 and "found no checkpoint" in result.stderr


def test_diverging_loss_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path, mnist_root):
    out = tmp_path / "r"
    result = train("--lr", "1e6", "--epochs", "3", "--train-limit", "3000", "--test-limit", "200",
                   "--data-dir", str(mnist_root), "--output-dir", str(out))
    assert result.returncode == 2
    assert "the loss diverged" in result.stderr and "at epoch" in result.stderr and "step" in result.stderr
    assert not (out / "model.safetensors").exists()
