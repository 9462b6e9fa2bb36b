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

from common import distributed
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
        self.test_sums = None  # test loss, correct and counted images, summed on the device
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
        """Sums on the device (no sync per batch). A label of -1 marks a test image repeated
        only to even out the ranks' shares: it is not counted."""
        keep = labels >= 0
        per_image = cross_entropy(logits, labels.clamp(min=0), reduction="none")
        sums = torch.stack([torch.where(keep, per_image, 0).sum(),
                            (keep & (logits.argmax(1) == labels)).sum().float(),
                            keep.sum().float()])
        self.test_sums = sums if self.test_sums is None else self.test_sums + sums

    def finish(self, loss_scale) -> tuple[dict, list[float]]:
        """(epoch row, step losses), with the losses copied to the host in one transfer. With
        several ranks (every rank calls this), a step's loss is the mean of the ranks' losses,
        the test metrics cover the whole test set, images count the whole job's and peak memory
        is the largest rank's (each rank's is listed)."""
        synchronize(self.device)
        epoch_time = time.perf_counter() - self.start
        world = distributed.size()
        losses = []
        if self.losses:
            losses = (distributed.sum_(torch.stack(self.losses).float()) / world).cpu().tolist()
        finite = [v for v in losses if math.isfinite(v)]
        attempted = len(losses)
        test = [None, None]
        if self.test_sums is not None:
            loss_sum, correct, count = distributed.sum_(self.test_sums).cpu().tolist()
            test = [loss_sum / count, correct / count] if count else test
        images = self.images * world  # every rank trains on as many images (padded alike)
        peaks = distributed.gather_ints(peak_memory_bytes(self.device), self.device)
        row = {
            "epoch": self.epoch,
            "train_loss": sum(finite) / len(finite) if finite else None,
            "test_loss": test[0],
            "test_acc": test[1],
            "epoch_time_s": epoch_time,
            "train_time_s": self.train_time,
            "train_cpu_s": self.train_cpu,  # process CPU time: on a GPU, the host's share
            "images_per_s": images / self.train_time if self.train_time > 0 else None,
            "data_wait_s": self.data_wait,
            "peak_memory_bytes": max(peaks),
            **({"peak_memory_bytes_per_rank": peaks} if world > 1 else {}),
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
