"""FLOPs of one training step (forward and backward), counted once per run.

torch.utils.flop_counter.FlopCounterMode counts the matmuls and convolutions a step runs; on
the meta device it does so without computing anything (about a second for ResNet-18). BatchNorm,
activations and the optimizer are left out, as MFU conventions do. Measured for reference:
ResNet-18 (CIFAR) at batch 256 is 852.2 GFLOP a step, 3.33 GFLOP an image.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import models


def per_step(model_name: str, batch_size: int) -> int:
    with torch.device("meta"):
        model = models.MODELS[model_name]()
        x = torch.empty(batch_size, 3, 32, 32)
        y = torch.zeros(batch_size, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        models.cross_entropy(model(x), y).backward()
    return counter.get_total_flops()
