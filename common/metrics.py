"""Per-epoch measurements, taken the same way by each loop.

Step losses stay on the device and are copied to the host once per epoch: a .item() per step
would force a device sync per step and distort the very timing being compared.
"""
from __future__ import annotations

import math
import resource
import time
from contextlib import nullcontext

import torch

from common.activations import SavedTensors
from common.device import synchronize
from common.models import cross_entropy


class Diverged(RuntimeError):
    pass


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA allocator peak on a GPU; the process's peak RSS on CPU (ru_maxrss is KiB on Linux)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class StepCounter:
    """Counts optimizer steps that really ran. A GradScaler (or apex) that finds inf/nan
    gradients skips optimizer.step(), so attempted - executed = skipped, with no device sync."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.executed = 0
        optimizer.register_step_post_hook(self._hook)

    def _hook(self, *_):
        self.executed += 1


class EpochMeter:
    """Wall time (device-synchronised) and process CPU time, data wait, images, step losses and
    test metrics of one epoch. data_wait_s is host time between the end of one step and the
    start of the next."""

    def __init__(self, device: torch.device, epoch: int, steps: StepCounter):
        self.device, self.epoch, self.steps = device, epoch, steps
        synchronize(device)
        self.start = self.last = time.perf_counter()
        self.cpu_start = time.process_time()
        self.executed_at_start = steps.executed
        self.losses, self.images, self.data_wait = [], 0, 0.0
        self.test_loss = self.test_correct = None
        self.test_images = 0
        self.saved = None

    def saved_tensors(self, model: torch.nn.Module):
        """Around the forward of a step: on the run's first step (epoch 0, a warm-up epoch that
        no median includes), measures what it saves for backward; a no-op on every other."""
        if self.epoch != 0 or self.losses or self.saved is not None:
            return nullcontext()
        self.saved = SavedTensors(model)
        return self.saved

    def batch_start(self) -> None:
        self.data_wait += time.perf_counter() - self.last

    def step(self, loss: torch.Tensor, images: int) -> None:
        self.losses.append(loss.detach())
        self.images += images
        self.last = time.perf_counter()

    def train_done(self) -> None:
        synchronize(self.device)
        self.train_time = time.perf_counter() - self.start
        self.train_cpu = time.process_time() - self.cpu_start

    def eval_batch(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        loss = cross_entropy(logits, labels, reduction="sum")
        correct = (logits.argmax(1) == labels).sum()
        self.test_loss = loss if self.test_loss is None else self.test_loss + loss
        self.test_correct = correct if self.test_correct is None else self.test_correct + correct
        self.test_images += len(labels)

    def finish(self, loss_scale) -> tuple[dict, list[float]]:
        """(epoch row, step losses), with the losses copied to the host in one transfer."""
        synchronize(self.device)
        epoch_time = time.perf_counter() - self.start
        losses = torch.stack(self.losses).float().cpu().tolist() if self.losses else []
        finite = [v for v in losses if math.isfinite(v)]
        attempted = len(losses)
        row = {
            "epoch": self.epoch,
            "train_loss": sum(finite) / len(finite) if finite else None,
            "test_loss": self.test_loss.item() / self.test_images if self.test_images else None,
            "test_acc": self.test_correct.item() / self.test_images if self.test_images else None,
            "epoch_time_s": epoch_time,
            "train_time_s": self.train_time,
            "train_cpu_s": self.train_cpu,  # process CPU time: on a GPU, the host's share
            "images_per_s": self.images / self.train_time if self.train_time > 0 else None,
            "data_wait_s": self.data_wait,
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "steps": attempted,
            "skipped_steps": attempted - (self.steps.executed - self.executed_at_start),
            "loss_scale": loss_scale,
        }
        if self.saved is not None:
            row["saved_tensors"] = self.saved.bytes
        return row, losses


# Cross-entropy of a uniform guess over the 10 classes is ln 10 = 2.30; an epoch whose mean
# training loss is ten times that has learnt nothing and is moving away (lr 1e6 gave ~1e13).
LOSS_BOUND = 10 * math.log(10)
# A loss scale below 1 means the fp16 gradients overflow even unscaled: the scaler skips every
# step, and the run only looks alive.
SCALE_FLOOR = 1.0


def divergence(row: dict, losses: list[float]) -> str | None:
    """Why this epoch shows a diverged run, or None. One non-finite fp16 loss is routine (the
    scaler skips that step); a non-finite loss at the end of an epoch means it did not recover."""
    if losses and not math.isfinite(losses[-1]):
        return f"loss is {losses[-1]} at the end of epoch {row['epoch']}"
    if row["train_loss"] is not None and row["train_loss"] > LOSS_BOUND:
        return (f"mean training loss {row['train_loss']:.4g} in epoch {row['epoch']}, above "
                f"{LOSS_BOUND:.1f} (10 x ln 10, ten times a uniform guess's loss)")
    if row["loss_scale"] is not None and row["loss_scale"] < SCALE_FLOOR:
        return (f"the loss scale fell to {row['loss_scale']:.3g} in epoch {row['epoch']}, below "
                f"{SCALE_FLOOR:g}: fp16 gradients overflow even unscaled")
    return None
