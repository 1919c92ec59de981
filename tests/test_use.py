"""Using trained weights: `mnist_dist.evaluate` and `mnist_dist.predict`, run as a user runs them."""
import json
import os
import re
import shutil
import sys

import pytest
import torch
from PIL import Image, ImageDraw, ImageOps
from safetensors.torch import load_file

from mnist_dist import evaluate, predict
from mnist_dist.data import MEAN, STD, DeviceMNIST, load_tensors
from mnist_dist.model import Net

from conftest import ACCELERATE, read_metrics, run

LINE = re.compile(r"^(.+): (\d) \(p=(\d\.\d{3})\)$")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_root):
    """A small but decent run folder, trained once for this module."""
    out = tmp_path_factory.mktemp("use") / "run"
    result = run([sys.executable, "-m", "mnist_dist.train", "--epochs", "3", "--train-limit", "6000",
                  "--test-limit", "500", "--target-acc", "100", "--data-dir", str(mnist_root),
                  "--output-dir", str(out)], timeout=300)
    assert result.returncode == 0, result.stderr
    assert read_metrics(out)["final_val_acc"] >= 90
    return out


@pytest.fixture(scope="module")
def direct(trained, mnist_root):
    """(probabilities, labels) for the 10,000 test images, computed here without the tools."""
    net = Net()
    net.load_state_dict(load_file(trained / "model.safetensors"))
    net.eval()
    ds = DeviceMNIST(*load_tensors(mnist_root, train=False), "cpu")
    with torch.inference_mode():
        probs = torch.cat([net(x).softmax(1) for x in ds.x.split(1000)])
    return probs, ds.y


@pytest.fixture(scope="module")
def one_process(trained, mnist_root, tmp_path_factory):
    """`python -m mnist_dist.evaluate RUN_DIR --json`: (completed process, its JSON)."""
    out = tmp_path_factory.mktemp("eval") / "one.json"
    result = run([sys.executable, "-m", "mnist_dist.evaluate", str(trained), "--data-dir", str(mnist_root),
                  "--json", str(out)], timeout=300)
    assert result.returncode == 0, result.stderr
    return result, json.loads(out.read_text())


def test_evaluate_one_process_is_exact_and_consistent(one_process, direct):
    result, r = one_process
    probs, labels = direct
    pred = probs.argmax(1)
    expected = torch.bincount(labels * 10 + pred, minlength=100).view(10, 10)
    assert r["confusion"] == expected.tolist()  # rows true, columns predicted
    correct = int((pred == labels).sum())
    assert r["correct"] == correct == sum(r["confusion"][c][c] for c in range(10))
    assert r["total"] == sum(map(sum, r["confusion"])) == 10_000
    assert r["accuracy"] == pytest.approx(100 * correct / 10_000)
    for c in range(10):
        in_class = labels == c
        assert r["per_class"][c] == pytest.approx(100 * float((pred[in_class] == c).float().mean()))
    assert f"test accuracy {r['accuracy']:.2f}% ({correct}/10000)" in result.stdout


def test_evaluate_two_processes_gives_the_same_counts(one_process, trained, mnist_root, tmp_path):
    out = tmp_path / "two.json"
    # 10,000 images in batches of 999 over 2 ranks: the last batches are padded
    # with repeated images, which must not be counted. A .safetensors path this time.
    result = run([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0",
                  "-m", "mnist_dist.evaluate", str(trained / "model.safetensors"), "--data-dir", str(mnist_root),
                  "--batch-size", "999", "--json", str(out)], env={"ACCELERATE_USE_CPU": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    two, one = json.loads(out.read_text()), one_process[1]
    assert two["total"] == 10_000
    assert (two["correct"], two["confusion"]) == (one["correct"], one["confusion"])
    assert result.stdout.count("test accuracy") == 1  # only the main process prints


def test_evaluate_bad_weights_is_a_one_line_error(tmp_path, mnist_root, capsys):
    garbage = tmp_path / "w.safetensors"
    garbage.write_text("not weights")
    for path in (tmp_path / "missing", garbage):
        assert evaluate.main([str(path), "--data-dir", str(mnist_root)]) == 2  # returned, not raised
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and path.name in err and "Traceback" not in err


def mnist_png(image: torch.Tensor, path) -> str:
    """A test image as a user's file: twice the size, dark digit on white."""
    ImageOps.invert(Image.fromarray(image.numpy())).resize((56, 56), Image.LANCZOS).save(path)
    return str(path)


def drawn(path, draw) -> str:
    """Black ink on a 200x200 white canvas, as drawn in a paint program."""
    canvas = Image.new("RGB", (200, 200), "white")
    draw(ImageDraw.Draw(canvas))
    canvas.save(path)
    return str(path)


def test_predict_agrees_with_the_labels_of_exported_test_digits_and_skips_a_bad_file(trained, mnist_root, tmp_path):
    """100 test images drawn at random (all ten digits among them), exported as a user's PNG files,
    plus two digits drawn in a paint program, a file that is no image and a blank page."""
    images, labels = load_tensors(mnist_root, train=False)
    picks = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:100].tolist()
    assert set(labels[picks].tolist()) == set(range(10))
    expected = {mnist_png(images[i], tmp_path / f"test{i}.png"): int(labels[i]) for i in picks}
    expected[drawn(tmp_path / "one.png", lambda d: d.line([(100, 30), (100, 170)], fill="black", width=18))] = 1
    expected[drawn(tmp_path / "zero.jpg", lambda d: d.ellipse([55, 25, 145, 175], outline="black", width=16))] = 0
    bad, blank = tmp_path / "x.png", tmp_path / "blank.png"
    bad.write_text("this is not an image")
    Image.new("RGB", (200, 200), "white").save(blank)  # no digit: no answer, rather than a made-up one
    paths = list(expected)
    result = run([sys.executable, "-m", "mnist_dist.predict", "--weights", str(trained),
                  *paths[:50], str(bad), *paths[50:80], str(blank), *paths[80:]], timeout=300)

    assert result.returncode == 2
    assert result.stderr.count("\n") == 2 and "Traceback" not in result.stderr
    assert "skipped" in result.stderr and "x.png" in result.stderr and "blank.png' (ValueError: no digit" in result.stderr
    got = {}
    for line in result.stdout.splitlines():  # the images after the bad one are answered too
        path, label, p = LINE.match(line).groups()
        assert 0 < float(p) <= 1
        got[path] = int(label)
    assert got.keys() == expected.keys()
    agree = sum(got[p] == expected[p] for p in expected) / len(expected)
    # The network scores 96-98% on the test set; re-centred and re-scaled PNGs cost a little.
    assert agree >= 0.9, agree
    assert got[paths[-2]] == 1 and got[paths[-1]] == 0


def test_predict_defaults_to_the_newest_run(trained, tmp_path, monkeypatch, capsys):
    image = drawn(tmp_path / "one.png", lambda d: d.line([(100, 30), (100, 170)], fill="black", width=18))
    monkeypatch.chdir(tmp_path)
    assert predict.main([image]) == 2
    assert "runs/" in capsys.readouterr().err
    (tmp_path / "runs/old").mkdir(parents=True)
    (tmp_path / "runs/old/model.safetensors").write_text("older and broken")
    os.utime(tmp_path / "runs/old/model.safetensors", (1e9, 1e9))
    (tmp_path / "runs/new").mkdir()
    shutil.copy(trained / "model.safetensors", tmp_path / "runs/new")
    assert predict.main([image]) == 0  # the broken older run would fail
    assert LINE.match(capsys.readouterr().out.strip()).group(2) == "1"


def test_to_mnist_crops_scales_and_centres_by_mass():
    # A dark, lopsided blob in a corner of a wide, light grey page.
    page = Image.new("L", (300, 120), 200)
    ImageDraw.Draw(page).polygon([(10, 10), (90, 10), (10, 60)], fill=20)
    x = predict.to_mnist(page)
    assert x.shape == (1, 28, 28)
    ink = x[0] * STD + MEAN  # back to [0, 1]
    rows, cols = torch.nonzero(ink > 0.1, as_tuple=True)
    assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 == 20  # longer side scaled to 20
    mass = ink.sum()
    centre = [float((ink.sum(dim) * torch.arange(28)).sum() / mass) for dim in (1, 0)]
    assert centre == [pytest.approx(13.5, abs=1.5)] * 2
    assert float(x[0, 0, 0]) == float(x[0, -1, -1]) == pytest.approx(-MEAN / STD)  # empty field, MNIST's black
    assert float(ink.max()) == pytest.approx(1)
    # Light ink on dark is already MNIST's way round: the same digit either way.
    assert torch.allclose(predict.to_mnist(ImageOps.invert(page)), x, atol=1e-5)
