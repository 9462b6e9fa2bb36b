"""CIFAR-10 (real or synthetic) as uint8 tensors, with batched crop/flip augmentation.

The training order and every augmentation draw come from a generator seeded with
(seed, epoch) inside the sampler, and nowhere else. A framework may call iter() on a loader as
often as it likes (Lightning's fit loop does) or prefetch a batch ahead: batch k of epoch e is
the same tensor every time. That is what makes the plain and Lightning loops bitwise comparable.
"""

from __future__ import annotations

import math
import os
import urllib.error
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from common.errors import UsageError

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
PAD = 4  # RandomCrop(32, padding=4), the standard CIFAR augmentation
SIZE = 32


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 [N, 3, 32, 32]
    labels: torch.Tensor  # int64 [N]


def load(cfg) -> tuple[ImageSet, ImageSet]:
    """(train, test) for cfg.dataset. Raises UsageError when CIFAR-10 cannot be had."""
    if cfg.dataset == "synthetic":
        return synthetic(cfg.seed, cfg.synthetic_size, max(1, cfg.synthetic_size // 5))
    return cifar10(cfg.data_dir, cfg.download)


def cifar10(data_dir: str, download: bool) -> tuple[ImageSet, ImageSet]:
    # torchvision is imported where it is used, here and in the model and environment code:
    # the commands that build no dataset or model (report, --help) need not pay for it.
    from torchvision.datasets import CIFAR10

    folder = os.path.join(data_dir, CIFAR10.base_folder)
    damaged, missing = _check_cifar10(folder)
    if damaged:
        raise UsageError(
            f"CIFAR-10 in {folder}: {damaged} is there but fails its md5 check "
            f"(cut short, or another file); delete it and run with --download, "
            f"or copy the original there"
        )
    if missing and os.path.isdir(folder) and not download:
        raise UsageError(
            f"CIFAR-10 in {folder} lacks {', '.join(missing)}; run with "
            f"--download, or copy cifar-10-batches-py there whole"
        )
    try:
        sets = [CIFAR10(data_dir, train=train, download=download) for train in (True, False)]
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted."
        state = "failed its integrity check (md5)" if os.path.isdir(folder) else "is not there"
        raise UsageError(
            f"CIFAR-10 in {folder} {state}; run with --download, or use --dataset synthetic"
        ) from e
    except (urllib.error.URLError, OSError) as e:
        raise UsageError(
            f"CIFAR-10 is not in {folder} and could not be downloaded "
            f"({getattr(e, 'reason', e)}); copy cifar-10-batches-py there, or use "
            f"--dataset synthetic"
        ) from e
    return tuple(
        ImageSet(
            torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(),
            torch.tensor(s.targets, dtype=torch.long),
        )
        for s in sets
    )


def _check_cifar10(folder: str) -> tuple[Optional[str], list[str]]:
    """(the first file that is there but fails its md5, the files that are not there), against
    the checksums torchvision holds for the official archive."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    expected = [
        *CIFAR10.train_list,
        *CIFAR10.test_list,
        [CIFAR10.meta["filename"], CIFAR10.meta["md5"]],
    ]
    missing = []
    for name, md5 in expected:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            missing.append(name)
        elif not check_integrity(path, md5):
            return name, missing
    return None, missing


# The synthetic classes: each image is a sum of two plane waves, (wavelength in px, orientation
# in degrees) twice: a grating (both waves the same), a plaid, or a plaid of two wavelengths.
# They are periodic textures, so a 4-px crop keeps the class; and mirror-symmetric (0 and 90
# degrees map to themselves, 45 and 135 to each other), so a horizontal flip keeps it too.
WAVES = torch.tensor(
    [
        [8, 0, 8, 0],
        [8, 90, 8, 90],
        [4, 0, 4, 0],
        [4, 90, 4, 90],
        [8, 0, 8, 90],
        [8, 45, 8, 135],
        [4, 0, 4, 90],
        [4, 45, 4, 135],
        [8, 0, 4, 90],
        [4, 0, 8, 90],
    ],
    dtype=torch.float32,
)
NOISE = 1.6  # noise over pattern amplitude: the difficulty (1.0 gave 96% after 10 epochs)


CHUNK = 4096  # images made at once: the float intermediates of a chunk, not of the whole set


def synthetic(seed: int, n_train: int, n_test: int) -> tuple[ImageSet, ImageSet]:
    """CIFAR-shaped uint8 images whose class a model has to learn: a noisy texture drawn with a
    random colour, contrast, phase and a jittered frequency and tilt, none of which depends on
    the class. Neither the nearest class-mean image nor the mean colour does better than chance
    on it (tests/test_data.py); the small CNN reaches 70-81% after 10 epochs
    (docs/benchmark.md). Made CHUNK images at a time, so that memory stays near the uint8 set's
    own size (3 GiB for 10^6 images), with the same draws as one pass over the whole set."""
    g = torch.Generator().manual_seed(seed)
    freq, tilt = 2 * math.pi / WAVES[:, 0::2], WAVES[:, 1::2].deg2rad()

    def make(n: int) -> ImageSet:
        def uniform(*shape):
            return torch.rand(*shape, generator=g)

        labels = torch.randint(0, 10, (n,), generator=g)
        f = freq[labels] * (0.85 + 0.3 * uniform(n, 1))  # +-15% wavelength
        theta = tilt[labels] + math.radians(10) * (2 * uniform(n, 1) - 1)  # +-10 degrees
        phase = 2 * math.pi * uniform(n, 2)
        grating = (WAVES[labels, :2] == WAVES[labels, 2:]).all(1, keepdim=True)
        phase = torch.where(grating, phase[:, :1], phase)  # one wave, drawn twice
        # The noise comes next in the generator's order, before the colours: step over it
        # chunk by chunk now, and draw it again, chunk by chunk, from a copy of the state.
        noise = torch.Generator().set_state(g.get_state())
        for start in range(0, n, CHUNK):
            torch.randn(min(CHUNK, n - start), SIZE, SIZE, generator=g)
        # Colour carries no class: a random base colour, a random signed colour direction
        # and a random contrast for the noisy pattern.
        base = 255 * (0.25 + 0.5 * uniform(n, 3, 1, 1)) + 0.5
        direction = 2 * uniform(n, 3, 1, 1) - 1
        contrast = 0.5 * 255 * (0.1 + 0.15 * uniform(n, 1, 1, 1))
        amplitude = contrast * direction / direction.abs().amax(1, keepdim=True)
        images = torch.empty(n, 3, SIZE, SIZE, dtype=torch.uint8)
        xs = torch.arange(float(SIZE))
        for start in range(0, n, CHUNK):
            part = slice(start, min(start + CHUNK, n))
            m = part.stop - part.start
            # f * (x cos t + y sin t) + phase, separable: [m, 2, 1, 32] + [m, 2, 32, 1]
            fx, fy = (f[part] * theta[part].cos()), (f[part] * theta[part].sin())
            along_x = (fx[..., None] * xs + phase[part][..., None])[:, :, None, :]
            along_y = (fy[..., None] * xs)[:, :, :, None]
            pattern = (along_x + along_y).cos().sum(1)  # [m, 32, 32], in [-2, 2]
            pattern += 2 * NOISE * torch.randn(m, SIZE, SIZE, generator=noise)
            images[part] = (
                torch.addcmul(base[part], amplitude[part], pattern[:, None])
                .clamp_(0, 255)
                .to(torch.uint8)
            )
        return ImageSet(images, labels)

    return make(n_train), make(n_test)


class EpochSampler(Sampler):
    """Batches of draws for one rank: each batch a [b, 5] int64 tensor of (index, dx, dy, flip,
    keep). Order and draws depend only on (seed, epoch) — set_epoch is the hook
    DistributedSampler has, and Lightning calls it each epoch — never on how often a framework
    calls iter(). With several ranks, the epoch's draws are padded to a multiple of the world
    size the way DistributedSampler pads (repeating the first ones) and this rank takes
    positions rank::world. Training counts the padding as samples, as DistributedSampler does;
    evaluation marks it keep=0, so that the test set is counted exactly once across ranks."""

    def __init__(
        self, n: int, batch_size: int, seed: int, augment: bool, rank: int = 0, world: int = 1
    ):
        self.n, self.batch_size, self.seed, self.augment = n, batch_size, seed, augment
        self.rank, self.world, self.epoch = rank, world, 0
        self.sampler = self  # where frameworks look for set_epoch: batch_sampler.sampler

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def per_rank(self) -> int:
        return -(-self.n // self.world)

    def __len__(self) -> int:
        return -(-self.per_rank() // self.batch_size)

    def draws(self) -> torch.Tensor:
        """This rank's (index, dx, dy, flip, keep) for the epoch, in order."""
        n = self.n
        if self.augment:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=g)
            shifts = torch.randint(0, 2 * PAD + 1, (2, n), generator=g)
            flip = torch.randint(0, 2, (n,), generator=g)
            draws = torch.stack([order, shifts[0], shifts[1], flip, torch.ones_like(order)], 1)
        else:  # the whole set in order, centred, unflipped
            draws = torch.tensor([[0, PAD, PAD, 0, 1]]).repeat(n, 1)
            draws[:, 0] = torch.arange(n)
        padding = self.per_rank() * self.world - n
        if padding:
            extra = draws[torch.arange(padding) % n].clone()
            extra[:, 4] = int(self.augment)  # padded test images are not counted
            draws = torch.cat([draws, extra])
        return draws[self.rank :: self.world]

    def __iter__(self):
        yield from self.draws().split(self.batch_size)


class AugmentedImages(Dataset):
    """The images, zero-padded once and kept on the device with a mirrored copy, and a batch's
    crop, flip and normalisation as a few tensor ops there: one gather from a strided view of
    every image's 9 x 9 crop positions, one conversion to float. The same code runs on a CPU and
    on a GPU and gives the same uint8 crops for the same draws; on a GPU the set is copied there
    once, not every batch. (Of the ways tried, the gather was the fastest: an index computed
    per pixel, and a gather from the padded set alone with the crops drawn mirrored flipped
    afterwards, were slower; the second holds half the memory.) The pair is filled in place:
    8.9 GiB for 10^6 images, besides the 2.9 GiB of the set itself."""

    def __init__(self, images: ImageSet, device: torch.device, channels_last: bool):
        n, side = len(images.labels), SIZE + 2 * PAD
        # [as drawn | mirrored, image, channel, row, column], zero-padded
        both = torch.zeros(2, n, 3, side, side, dtype=torch.uint8, device=device)
        for start in range(0, n, CHUNK):  # a chunk at a time through the device
            part = images.images[start : start + CHUNK].to(device)
            both[0, start : start + CHUNK, :, PAD : PAD + SIZE, PAD : PAD + SIZE] = part
            both[1, start : start + CHUNK, :, PAD : PAD + SIZE, PAD : PAD + SIZE] = part.flip(3)
        # [mirrored, image, dy, dx, channel, row, column]: every crop, as a view (no copy)
        self.windows = both.as_strided(
            (2, n, 2 * PAD + 1, 2 * PAD + 1, 3, SIZE, SIZE),
            (n * 3 * side * side, 3 * side * side, side, 1, side * side, side, 1),
        )
        self.labels = images.labels.to(device)
        std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
        self.scale = 1 / (255 * std)
        self.shift = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) / std
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        return len(self.labels)

    def crops(self, draws: torch.Tensor) -> torch.Tensor:
        """uint8 [b, 3, 32, 32]: each image cropped at (dx, dy) of its padding, maybe mirrored.
        A mirrored crop at dx is the crop at 2 * PAD - dx of the mirrored image."""
        draws = draws.to(self.labels.device, non_blocking=True)
        idx, dx, dy, flip = draws[:, 0], draws[:, 1], draws[:, 2], draws[:, 3]
        return self.windows[flip, idx, dy, torch.where(flip.bool(), 2 * PAD - dx, dx)]

    def __getitems__(self, draws: torch.Tensor):
        draws = draws.to(self.labels.device, non_blocking=True)
        x = self.crops(draws).float().mul_(self.scale).sub_(self.shift)
        y = torch.where(draws[:, 4].bool(), self.labels[draws[:, 0]], -1)
        return x.contiguous(memory_format=self.memory_format), y


def describe_memory(cfg) -> str:
    """What the data sets of a run take: the uint8 images, and the loaders' padded pair."""
    n = (
        cfg.synthetic_size + max(1, cfg.synthetic_size // 5)
        if cfg.dataset == "synthetic"
        else 60000
    )
    images = n * 3 * SIZE * SIZE
    pair = 2 * n * 3 * (SIZE + 2 * PAD) ** 2
    return (
        f"{n} images take {images / 2**30:.1f} GiB as uint8 and {pair / 2**30:.1f} GiB "
        f"more padded with their mirrored copy"
    )


def device_bytes(*loaders: DataLoader) -> int:
    """Bytes the loaders' image sets hold on a CUDA device (0 on a CPU): the same in every arm
    and at every precision, and part of the allocator's peak."""
    total = 0
    for loader in loaders:
        images = loader.dataset
        if images.labels.device.type == "cuda":
            total += sum(
                t.untyped_storage().nbytes()
                for t in (images.windows, images.labels, images.scale, images.shift)
            )
    return total


def _whole_batch(batch):
    return batch  # __getitems__ already returns the collated (images, labels)


def loaders(
    cfg,
    sets: tuple[ImageSet, ImageSet],
    device: torch.device,
    channels_last: bool,
    rank: int = 0,
    world: int = 1,
):
    """(train, test) loaders, built identically for every implementation. --batch-size is the
    whole job's: each of `world` ranks takes batch_size / world images a step. On CUDA the
    images live on the GPU, so the loader runs in the main process."""
    out = []
    if device.type == "cuda" and cfg.num_workers:
        raise UsageError(
            f"--num-workers {cfg.num_workers}: with CUDA the images live on the GPU "
            f"and are cropped there; worker processes would have nothing to do"
        )
    for images, augment in zip(sets, (True, False)):
        sampler = EpochSampler(
            len(images.labels), cfg.batch_size // world, cfg.seed, augment, rank, world
        )
        out.append(
            DataLoader(
                AugmentedImages(images, device, channels_last),
                batch_sampler=sampler,
                collate_fn=_whole_batch,
                num_workers=cfg.num_workers,
                persistent_workers=cfg.num_workers > 0,
            )
        )
    return tuple(out)


def steps_per_epoch(cfg, train_loader: DataLoader) -> int:
    return min(len(train_loader), cfg.limit_train_batches or len(train_loader))
