"""The models: plain nn.Modules that know nothing about any training loop, the optimizer and
loss every arm uses, and the unwrapping of what is saved. Every arm builds its model through
model_spec.build_model, which also builds torchvision's, timm's and the user's."""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # A mean, not adaptive_avg_pool2d: that op's CUDA backward has no deterministic kernel, and
    # torch refuses it under --deterministic, which the GPU parity runs need.
    return x.mean(dim=(2, 3))


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"):
    """F.cross_entropy, in fp32, written as log_softmax + gather: nll_loss's CUDA backward
    accumulates with atomicAdd and torch refuses it under --deterministic. reduction "none"
    gives each sample's loss."""
    picked = -F.log_softmax(logits.float(), dim=1).gather(1, labels[:, None]).squeeze(1)
    return {"sum": picked.sum, "mean": picked.mean}.get(reduction, lambda: picked)()


class BasicBlock(nn.Module):
    def __init__(self, inp: int, out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.shortcut = nn.Sequential()
        if stride != 1 or inp != out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18, CIFAR variant: a 3x3 stride-1 stem and no max-pool, so 32x32 inputs keep
    their resolution into the first stage (the ImageNet stem would shrink them to 8x8)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, inp = [], 64
        for out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(inp, out, stride), BasicBlock(out, out, 1)))
            inp = out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(global_avg_pool(x))


class ConvBlock(nn.Sequential):
    """conv-BN-ReLU-pool: one stage of the small CNN (a block: FSDP shards it as one unit)."""

    def __init__(self, inp: int, out: int):
        super().__init__(
            nn.Conv2d(inp, out, 3, padding=1, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU-pool stages and a linear head: seconds per epoch on a CPU."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        chans = (3, width, 2 * width, 4 * width)
        self.features = nn.Sequential(*[ConvBlock(a, b) for a, b in zip(chans, chans[1:])])
        self.fc = nn.Linear(chans[-1], num_classes)

    def forward(self, x):
        return self.fc(global_avg_pool(self.features(x)))


class LinearProbe(nn.Module):
    """A linear classifier on the raw pixels: next to no compute, so that a step's time is the
    framework's own (ampcompare bench measures each framework's cost per step with it)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


MODELS = {"resnet18": ResNet18, "small": SmallCNN, "linear": LinearProbe}


def unwrapped(model: nn.Module) -> nn.Module:
    """The common model itself, out of DDP's wrapper (.module) and torch.compile's
    (._orig_mod): what is saved, loaded and hashed, so that every arm's keys are the same."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def build_optimizer(cfg, model: nn.Module, steps_per_epoch: int):
    """(optimizer, per-step LR scheduler), the same object types for every implementation."""
    if cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return optimizer, scheduler
