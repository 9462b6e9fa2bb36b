"""CIFAR-10 (real or synthetic) as uint8 tensors, with batched crop/flip augmentation.

The training order and every augmentation draw come from a generator seeded with
(seed, epoch) inside the sampler, and nowhere else. A framework may call iter() on a loader as
often as it likes (Lightning's fit loop does) or prefetch a batch ahead: batch k of epoch e is
the same tensor every time. That is what makes the plain and Lightning loops bitwise comparable.
"""
from __future__ import annotations

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


def synthetic(seed: int, n_train: int, n_test: int) -> tuple[ImageSet, ImageSet]:
    """CIFAR-shaped uint8 images whose class is learnable: each class has its own colour and a
    smooth pattern (8x8 upsampled, so it survives 4-px crops and flips), plus per-image noise."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.rand(10, 3, 1, 1, generator=g)
    pattern = F.interpolate(torch.rand(10, 3, 8, 8, generator=g), size=SIZE, mode="bilinear",
                            align_corners=False)
    prototypes = 0.5 * colour + 0.5 * pattern

    def make(n: int) -> ImageSet:
        labels = torch.randint(0, 10, (n,), generator=g)
        noise = torch.rand(n, 3, SIZE, SIZE, generator=g)
        images = 0.55 * prototypes[labels] + 0.45 * noise
        return ImageSet((images * 255).round().to(torch.uint8), labels)

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
    """(train, test) loaders, built identically for all three implementations."""
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
