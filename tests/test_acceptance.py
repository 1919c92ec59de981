"""The product's promise, as the README runs it: the default recipe reaches 99.41% on all of MNIST
in fewer than 20 epochs, launched with no accelerate config (a fresh machine)."""
import pytest

from conftest import ACCELERATE, read_metrics, run


@pytest.mark.slow
def test_acceptance_default_recipe_reaches_target_on_real_mnist(tmp_path, mnist_root):
    out = tmp_path / "run"
    result = run([ACCELERATE, "launch", "-q", "-m", "mnist_dist.train", "--data-dir", str(mnist_root),
                  "--output-dir", str(out)], timeout=1800)
    assert result.returncode == 0, result.stderr
    m = read_metrics(out)
    assert m["reached_target"] and m["final_val_acc"] >= 99.41 and m["epochs"][-1]["val_total"] == 10000
    # It stopped at the first epoch that reached the target, well before the cap of 19 (epoch 5 on every
    # machine measured for seed 1, the default; the latest seed of ten needed 9).
    correct = [e["val_correct"] for e in m["epochs"]]
    assert m["stop_epoch"] == len(correct) <= 9 and max(correct[:-1], default=0) < 9941 <= correct[-1]
