import os
import urllib.error

import pytest
import torch

from common import data
from common.errors import UsageError
from tests.conftest import tiny


def test_cifar10_loader_reads_an_archive_in_cifar_format(cifar_archive):
    train, test = data.cifar10(str(cifar_archive), download=False)
    assert train.images.shape == (50, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (10, 3, 32, 32)
    assert train.labels.dtype == torch.long and int(train.labels.max()) < 10
    # Row layout: CIFAR stores each image as 1024 red, then green, then blue bytes.
    import pickle
    with open(cifar_archive / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        raw = pickle.load(f)
    assert torch.equal(train.images[0].reshape(-1), torch.from_numpy(raw["data"][0]))


def test_cifar10_loader_rejects_a_corrupted_archive(cifar_archive):
    path = cifar_archive / "cifar-10-batches-py" / "data_batch_3"
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(UsageError, match="failed its integrity check"):
        data.cifar10(str(cifar_archive), download=False)


def test_cifar10_missing_without_download(tmp_path):
    with pytest.raises(UsageError, match="is not there.*--dataset synthetic"):
        data.cifar10(str(tmp_path / "nothing"), download=False)


def test_cifar10_missing_and_offline(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(tvu, "download_url", offline)
    with pytest.raises(UsageError, match="could not be downloaded.*--dataset synthetic"):
        data.cifar10(str(tmp_path / "nothing"), download=True)
    assert not any((tmp_path / "nothing").glob("**/*.tar.gz"))


def test_synthetic_is_deterministic_per_seed():
    a, _ = data.synthetic(0, 64, 16)
    b, _ = data.synthetic(0, 64, 16)
    c, _ = data.synthetic(1, 64, 16)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


def _batches(loader, n=3):
    return [(x.clone(), y.clone()) for (x, y), _ in zip(loader, range(n))]


def test_order_and_augmentation_depend_only_on_seed_and_epoch(tmp_path):
    cfg = tiny(tmp_path)
    train_loader, _ = data.loaders(cfg, data.load(cfg), torch.device("cpu"), False)
    sampler = train_loader.batch_sampler.sampler
    sampler.set_epoch(1)
    first = _batches(train_loader)
    iter(train_loader)  # a framework calling iter() an extra time must change nothing
    sampler.set_epoch(0)
    epoch0 = _batches(train_loader)
    sampler.set_epoch(1)
    again = _batches(train_loader)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], epoch0[0][0])


def test_augmentation_is_a_padded_crop_and_flip():
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8)
    ds = data.AugmentedImages(data.ImageSet(images.view(2, 3, 32, 32), torch.tensor([3, 7])), False)
    x, y = ds.__getitems__([(0, 4, 4, 0), (1, 0, 8, 1), (0, 4, 4, 1)])
    mean, std = ds.mean[0], ds.std[0]
    raw = (x * std + mean) * 255
    assert torch.allclose(raw[0], images.view(2, 3, 32, 32)[0].float(), atol=1e-3)  # centre crop
    assert torch.allclose(raw[2], raw[0].flip(2), atol=1e-3)  # horizontal flip
    # dx=0, dy=8: shifted 4 px right and 4 px up, so 4 zero-padding columns on the left and
    # 4 zero-padding rows at the bottom (zero bytes normalise to -mean/std).
    assert torch.allclose(raw[1][:, :, -4:], torch.zeros(3, 32, 4), atol=1e-3)
    assert torch.allclose(raw[1][:, -4:, :], torch.zeros(3, 4, 32), atol=1e-3)
    assert y.tolist() == [3, 7, 3]


def nearest_mean_accuracy(train, test, features):
    """Test accuracy of the nearest class mean, on `features` of the uint8 images."""
    x, x_test = features(train.images.float()), features(test.images.float())
    means = torch.stack([x[train.labels == c].mean(0) for c in range(10)])
    predicted = torch.cdist(x_test, means).argmin(1)
    return (predicted == test.labels).float().mean().item()


@pytest.mark.parametrize("seed", [0, 1])
def test_synthetic_classes_must_be_learnt(seed):
    # Closed-form baselines that need no training: on raw pixels, and on the mean colour alone.
    train, test = data.synthetic(seed, 10000, 2000)
    pixels = nearest_mean_accuracy(train, test, lambda x: x.flatten(1))
    colour = nearest_mean_accuracy(train, test, lambda x: x.mean((2, 3)))
    assert pixels <= 0.40 and colour <= 0.25, (pixels, colour)
    counts = torch.bincount(train.labels, minlength=10)
    assert counts.min() > 800  # every class is there, about equally

