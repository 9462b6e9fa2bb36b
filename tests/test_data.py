import subprocess
import sys
import urllib.error

import pytest
import torch

from common import data
from common.errors import UsageError
from tests.conftest import ROOT, tiny


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


@pytest.mark.parametrize("download", [False, True])
def test_cifar10_loader_names_the_file_that_fails_its_checksum(
    cifar_archive, monkeypatch, download
):
    import torchvision.datasets.utils as tvu

    path = cifar_archive / "cifar-10-batches-py" / "data_batch_3"
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 0xFF
    path.write_bytes(bytes(blob))
    monkeypatch.setattr(tvu, "download_url", lambda *a, **k: pytest.fail("no download"))
    with pytest.raises(UsageError, match="data_batch_3 is there but fails its md5 check"):
        data.cifar10(str(cifar_archive), download=download)


def test_cifar10_with_a_file_missing_names_it(cifar_archive):
    (cifar_archive / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(UsageError, match="lacks test_batch; run with --download"):
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


def test_the_synthetic_set_is_made_a_chunk_at_a_time_with_the_same_draws(monkeypatch):
    # The whole set in one pass, as it was made before chunks (same generator order: labels,
    # frequency, tilt, phase, noise, colours), against chunks of 37 images.
    import math

    g = torch.Generator().manual_seed(4)
    n = 100
    labels = torch.randint(0, 10, (n,), generator=g)
    freq, tilt = 2 * math.pi / data.WAVES[:, 0::2], data.WAVES[:, 1::2].deg2rad()
    f = freq[labels] * (0.85 + 0.3 * torch.rand(n, 1, generator=g))
    theta = tilt[labels] + math.radians(10) * (2 * torch.rand(n, 1, generator=g) - 1)
    phase = 2 * math.pi * torch.rand(n, 2, generator=g)
    grating = (data.WAVES[labels, :2] == data.WAVES[labels, 2:]).all(1, keepdim=True)
    phase = torch.where(grating, phase[:, :1], phase)
    xs = torch.arange(32.0)
    along_x = ((f * theta.cos())[..., None] * xs + phase[..., None])[:, :, None, :]
    along_y = ((f * theta.sin())[..., None] * xs)[:, :, :, None]
    pattern = (along_x + along_y).cos().sum(1) + 2 * data.NOISE * torch.randn(
        n, 32, 32, generator=g
    )
    base = 255 * (0.25 + 0.5 * torch.rand(n, 3, 1, 1, generator=g)) + 0.5
    direction = 2 * torch.rand(n, 3, 1, 1, generator=g) - 1
    contrast = 0.5 * 255 * (0.1 + 0.15 * torch.rand(n, 1, 1, 1, generator=g))
    amplitude = contrast * direction / direction.abs().amax(1, keepdim=True)
    whole = torch.addcmul(base, amplitude, pattern[:, None]).clamp_(0, 255).to(torch.uint8)
    monkeypatch.setattr(data, "CHUNK", 37)
    train, _ = data.synthetic(4, n, 10)
    assert torch.equal(train.labels, labels) and torch.equal(train.images, whole)


def test_making_a_big_synthetic_set_takes_little_more_than_the_set(tmp_path):
    code = (
        "import resource, torch; from common import data; "
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        "data.synthetic(0, 100000, 20000); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    grown = int(proc.stdout) * 1024
    uint8 = 120000 * 3 * 32 * 32
    assert grown < 1.5 * uint8, (grown / 2**20, uint8 / 2**20)  # one pass: ~20x the set


def test_running_out_of_memory_for_the_data_is_one_line(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from ampcompare.cli import cli

    def full(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
            "can't allocate memory: you tried to allocate 9600000000 bytes."
        )

    monkeypatch.setattr(data, "loaders", full)
    r = CliRunner().invoke(
        cli,
        [
            "plain",
            "--dataset",
            "synthetic",
            "--synthetic-size",
            "1000",
            "--accelerator",
            "cpu",
            "--out-dir",
            str(tmp_path),
        ],
    )
    assert r.exit_code == 2 and r.stderr.startswith(
        "ampcompare: error: not enough memory for the data: 1200 images take 0.0 GiB as uint8"
    )
    assert "can't allocate memory" in r.stderr and not list(tmp_path.iterdir())


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
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again)
    )
    assert not torch.equal(first[0][0], epoch0[0][0])


def test_augmentation_is_a_padded_crop_and_flip():
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8)
    ds = data.AugmentedImages(
        data.ImageSet(images.view(2, 3, 32, 32), torch.tensor([3, 7])),
        torch.device("cpu"),
        False,
    )
    draws = torch.tensor([(0, 4, 4, 0, 1), (1, 0, 8, 1, 1), (0, 4, 4, 1, 1), (1, 4, 4, 0, 0)])
    x, y = ds.__getitems__(draws)
    mean, std = torch.tensor(data.MEAN).view(3, 1, 1), torch.tensor(data.STD).view(3, 1, 1)
    raw = (x * std + mean) * 255
    assert torch.allclose(
        raw[0], images.view(2, 3, 32, 32)[0].float(), atol=1e-3
    )  # centre crop
    assert torch.allclose(raw[2], raw[0].flip(2), atol=1e-3)  # horizontal flip
    # dx=0, dy=8, then mirrored: 4 zero-padding columns on the right (on the left before the
    # flip) and 4 zero-padding rows at the bottom.
    assert torch.allclose(raw[1][:, :, -4:], torch.zeros(3, 32, 4), atol=1e-3)
    assert torch.allclose(raw[1][:, -4:, :], torch.zeros(3, 4, 32), atol=1e-3)
    crop = images.view(2, 3, 32, 32)[1][:, 4:, :28]  # what dx=0, dy=8 keeps of the image
    assert torch.allclose(raw[1].flip(2)[:, :28, 4:], crop.float(), atol=1e-3)
    assert y.tolist() == [3, 7, 3, -1]  # keep=0: a padding repeat, not counted


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_share_an_epoch_the_way_distributed_sampler_does(world):
    whole = data.EpochSampler(10, 4, seed=5, augment=True)
    whole.set_epoch(2)
    epoch = whole.draws()
    parts = []
    for rank in range(world):
        s = data.EpochSampler(10, 4, seed=5, augment=True, rank=rank, world=world)
        s.set_epoch(2)
        parts.append(s.draws())
        assert len(s) == len(list(s))  # every rank steps as often
    assert {len(p) for p in parts} == {-(-10 // world)}
    union = torch.cat(parts)
    assert {tuple(r) for r in union.tolist()} == {tuple(r) for r in epoch.tolist()}
    # DistributedSampler's padding: the first draws again, to a multiple of the world size
    padded = torch.cat([epoch, epoch[: len(union) - 10]])
    assert torch.equal(torch.stack(parts, 1).reshape(-1, 5)[: len(padded)], padded)


def test_evaluation_counts_each_test_image_once_across_ranks():
    kept = []
    for rank in range(3):
        s = data.EpochSampler(10, 4, seed=0, augment=False, rank=rank, world=3)
        kept += [int(i) for i, *_, keep in s.draws().tolist() if keep]
    assert sorted(kept) == list(range(10))


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


@pytest.mark.gpu
def test_crops_on_the_gpu_are_the_cpu_crops():
    train, _ = data.synthetic(0, 512, 10)
    sampler = data.EpochSampler(512, 256, seed=0, augment=True)
    sampler.set_epoch(3)
    draws = next(iter(sampler))
    cpu = data.AugmentedImages(train, torch.device("cpu"), False).crops(draws)
    gpu = data.AugmentedImages(train, torch.device("cuda"), True).crops(draws)
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)


@pytest.mark.gpu
def test_the_image_sets_on_the_gpu_are_counted_once():
    from torch.utils.data import DataLoader

    sets = data.synthetic(0, 512, 128)
    on_gpu = [DataLoader(data.AugmentedImages(s, torch.device("cuda"), False)) for s in sets]
    # Each set padded to 40 x 40 and kept twice (as drawn and mirrored), plus int64 labels.
    images = sum(2 * len(s.labels) * 3 * 40 * 40 + 8 * len(s.labels) for s in sets)
    assert images <= data.device_bytes(*on_gpu) <= images + 1024


def test_on_cpu_no_data_is_on_a_device_and_no_peak_is_taken_less_it(tmp_path):
    from plain_torch import train as plain
    from tests.conftest import tiny

    record = plain.train(tiny(tmp_path, epochs=1)).to_dict()
    assert record["env"]["data_on_device_bytes"] == 0
    assert record["summary"]["peak_memory_bytes"] > 0
    assert record["summary"]["peak_beyond_data_bytes"] is None  # an RSS has no such part
