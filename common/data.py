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

import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

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
    from torchvision.datasets import CIFAR10

    folder = os.path.join(data_dir, CIFAR10.base_folder)
    try:
        sets = [CIFAR10(data_dir, train=train, download=download) for train in (True, False)]
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted."
        state = "failed its integrity check (md5)" if os.path.isdir(folder) else "is not there"
        raise UsageError(f"CIFAR-10 in {folder} {state}; run with --download, or use "
                         f"--dataset synthetic") from e
    except (urllib.error.URLError, OSError) as e:
        raise UsageError(f"CIFAR-10 is not in {folder} and could not be downloaded "
                         f"({getattr(e, 'reason', e)}); copy cifar-10-batches-py there, or use "
                         f"--dataset synthetic") from e
    return tuple(ImageSet(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(),
                          torch.tensor(s.targets, dtype=torch.long)) for s in sets)


# The synthetic classes: each image is a sum of two plane waves, (wavelength in px, orientation
# in degrees) twice: a grating (both waves the same), a plaid, or a plaid of two wavelengths.
# They are periodic textures, so a 4-px crop keeps the class; and mirror-symmetric (0 and 90
# degrees map to themselves, 45 and 135 to each other), so a horizontal flip keeps it too.
WAVES = torch.tensor([[8, 0, 8, 0], [8, 90, 8, 90], [4, 0, 4, 0], [4, 90, 4, 90],
                      [8, 0, 8, 90], [8, 45, 8, 135], [4, 0, 4, 90], [4, 45, 4, 135],
                      [8, 0, 4, 90], [4, 0, 8, 90]], dtype=torch.float32)
NOISE = 1.6  # noise over pattern amplitude: the difficulty (1.0 gave 96% after 10 epochs)


def synthetic(seed: int, n_train: int, n_test: int) -> tuple[ImageSet, ImageSet]:
    """CIFAR-shaped uint8 images whose class a model has to learn: a noisy texture drawn with a
    random colour, contrast, phase and a jittered frequency and tilt, none of which depends on
    the class. Neither the nearest class-mean image nor the mean colour does better than chance
    on it (tests/test_data.py); the small CNN reaches 75-80% after 10 epochs (README)."""
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
        xs = torch.arange(float(SIZE))
        # f * (x cos t + y sin t) + phase, separable: [n, 2, 1, 32] + [n, 2, 32, 1]
        along_x = ((f * theta.cos())[..., None] * xs + phase[..., None])[:, :, None, :]
        along_y = ((f * theta.sin())[..., None] * xs)[:, :, :, None]
        pattern = (along_x + along_y).cos().sum(1)  # [n, 32, 32], in [-2, 2]
        pattern += 2 * NOISE * torch.randn(n, SIZE, SIZE, generator=g)
        # Colour carries no class: a random base colour, a random signed colour direction
        # and a random contrast for the noisy pattern.
        base = 255 * (0.25 + 0.5 * uniform(n, 3, 1, 1)) + 0.5
        direction = 2 * uniform(n, 3, 1, 1) - 1
        contrast = 0.5 * 255 * (0.1 + 0.15 * uniform(n, 1, 1, 1))
        amplitude = contrast * direction / direction.abs().amax(1, keepdim=True)
        images = torch.addcmul(base, amplitude, pattern[:, None]).clamp_(0, 255)
        return ImageSet(images.to(torch.uint8), labels)

    return make(n_train), make(n_test)


class EpochSampler(Sampler):
    """Yields (index, dx, dy, flip) per image. Order and draws depend only on (seed, epoch);
    set_epoch is the hook DistributedSampler has and Lightning calls each epoch."""

    def __init__(self, n: int, seed: int, augment: bool):
        self.n, self.seed, self.augment, self.epoch = n, seed, augment, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if not self.augment:
            yield from ((i, PAD, PAD, 0) for i in range(self.n))
            return
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)
        dx = torch.randint(0, 2 * PAD + 1, (self.n,), generator=g)
        dy = torch.randint(0, 2 * PAD + 1, (self.n,), generator=g)
        flip = torch.randint(0, 2, (self.n,), generator=g)
        yield from zip(order.tolist(), dx.tolist(), dy.tolist(), flip.tolist())


class AugmentedImages(Dataset):
    """Applies the sampler's draws to a whole batch at once (gather-based crop, where-based
    flip, normalisation): a few tensor ops per batch instead of a PIL pipeline per image."""

    def __init__(self, images: ImageSet, channels_last: bool):
        self.images, self.labels = images.images, images.labels
        self.mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(STD).view(1, 3, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        x, y = self.__getitems__([key])
        return x[0], y[0]

    def __getitems__(self, keys):
        idx, dx, dy, flip = torch.tensor(keys, dtype=torch.long).unbind(1)
        padded = F.pad(self.images[idx], (PAD, PAD, PAD, PAD))
        span = torch.arange(SIZE)
        rows = (dy[:, None] + span)[:, None, :, None]
        cols = (dx[:, None] + span)[:, None, None, :]
        x = padded[torch.arange(len(idx))[:, None, None, None], torch.arange(3)[None, :, None, None],
                   rows, cols]
        x = torch.where(flip.bool()[:, None, None, None], x.flip(3), x)
        x = (x.float().div_(255) - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format), self.labels[idx]


def _whole_batch(batch):
    return batch  # __getitems__ already returns the collated (images, labels)


def loaders(cfg, sets: tuple[ImageSet, ImageSet], device: torch.device, channels_last: bool):
    """(train, test) loaders, built identically for every implementation."""
    out = []
    for images, augment in zip(sets, (True, False)):
        sampler = EpochSampler(len(images.labels), cfg.seed, augment)
        out.append(DataLoader(
            AugmentedImages(images, channels_last),
            batch_sampler=BatchSampler(sampler, cfg.batch_size, drop_last=False),
            collate_fn=_whole_batch, num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda", persistent_workers=cfg.num_workers > 0))
    return tuple(out)


def steps_per_epoch(cfg, train_loader: DataLoader) -> int:
    return min(len(train_loader), cfg.limit_train_batches or len(train_loader))
