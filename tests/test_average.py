"""--ema: the average of the weights that a run scores, stops on and saves, and that leaves training alone."""
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mnist_dist.average import Average, recompute_batchnorm
from mnist_dist.model import Net

from conftest import read_metrics, run


def test_the_average_weights_the_steps_seen_and_not_the_initial_weights():
    trained, net = nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(100.0)  # the initial copy: no share in any average
        trained.weight.fill_(1.0)
    average = Average(trained, net, decay=0.9, images=[])
    average.update(1)
    assert torch.equal(net.weight, trained.weight)
    with torch.no_grad():
        trained.weight.fill_(2.0)
    average.update(2)  # (0.9 x 1 + 1 x 2) / 1.9, each step weighted by 0.9^(steps since)
    assert net.weight.tolist() == [[pytest.approx((0.9 * 1 + 2) / 1.9)] * 2]


def test_batchnorm_is_recomputed_on_the_images_with_dropout_off_and_no_random_number_drawn():
    net = Net(dropout=0.5)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    images = [(torch.randn(32, 1, 28, 28), None) for _ in range(3)]
    rng = torch.random.get_rng_state()
    recompute_batchnorm(net, bns, images)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert not any(m.training for m in net.modules())
    # The first BatchNorm sees the first conv's ReLU: its mean is the mean over the three batches' means.
    first = net.layers[:2]
    expected = torch.stack([first(x).mean((0, 2, 3)) for x, _ in images]).mean(0)
    assert torch.allclose(bns[0].running_mean, expected, atol=1e-6)
    assert bns[0].momentum == 0.1 and int(bns[0].num_batches_tracked) == 3


def test_the_run_scores_and_saves_the_average_and_trains_as_without_it(tmp_path, mnist_root):
    flags = ["--epochs", "2", "--train-limit", "1280", "--test-limit", "301", "--target-acc", "100",
             "--report-to", "none", "--data-dir", str(mnist_root)]
    averaged, plain = tmp_path / "averaged", tmp_path / "plain"
    for out, extra in ((averaged, []), (plain, ["--ema", "0"])):
        result = run([sys.executable, "-m", "mnist_dist.train", *flags, *extra, "--output-dir", str(out)], timeout=300)
        assert result.returncode == 0, result.stderr
    last = "checkpoints/epoch_0002"
    # Training went to the bit as without the average: the trained weights and the training figures.
    trained, trained_plain = load_file(averaged / last / "model.safetensors"), load_file(plain / last / "model.safetensors")
    assert all(torch.equal(trained[k], trained_plain[k]) for k in trained)
    rows = [[(e["train_loss"], e["train_acc"]) for e in read_metrics(out)["epochs"]] for out in (averaged, plain)]
    assert rows[0] == rows[1]
    # The run saved the average (also checkpointed, as Accelerate's second model), not the trained weights.
    saved, checkpointed = load_file(averaged / "model.safetensors"), load_file(averaged / last / "model_1.safetensors")
    assert all(torch.equal(saved[k], checkpointed[k]) for k in saved)
    assert not torch.equal(saved["layers.0.weight"], trained["layers.0.weight"])
    assert read_metrics(averaged)["weights"].startswith("exponential moving average, decay 0.998 per step")
    # Without it: the trained weights, and no second model in the checkpoints.
    assert read_metrics(plain)["weights"] == "trained" and not (plain / last / "model_1.safetensors").exists()
    saved_plain = load_file(plain / "model.safetensors")
    assert all(torch.equal(saved_plain[k], trained_plain[k]) for k in saved_plain)
