"""Per-epoch measurements, taken the same way by each loop.

Step losses stay on the device and are copied to the host once per epoch: a .item() per step
would force a device sync per step and distort the very timing being compared. Step times follow
the same rule: on a CPU each step is stamped with perf_counter; on CUDA with a pair of timing
events recorded on the stream, read once when the epoch ends.
"""

from __future__ import annotations

import math
import resource
import time
from contextlib import contextmanager, nullcontext
from typing import Callable, Optional

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
    """CUDA allocator peak on a GPU; the process's peak RSS on CPU (ru_maxrss is KiB on
    Linux)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class StepCounter:
    """Counts optimizer steps that really ran. A GradScaler (or apex) that finds inf/nan
    gradients skips optimizer.step(), so attempted - executed = skipped, with no device sync."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.executed, self.optimizer = 0, optimizer
        optimizer.register_step_post_hook(self._hook)

    def _hook(self, *_):
        self.executed += 1


class HostClock:
    """Stamps with perf_counter: on a CPU the host's time is the step's time."""

    name = "perf_counter"

    def __init__(self):
        self.stamps = []

    def mark(self) -> None:
        self.stamps.append(time.perf_counter())

    def read(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


class CudaClock:
    """Stamps on the GPU: a timing event recorded on the current stream, without a sync, read
    once after the epoch's synchronize. The time between two is the stream's, so a step the
    host holds up (a small model, a slow framework) counts as long as the GPU waited for it."""

    name = "cuda events"
    Event = torch.cuda.Event  # tests put a stand-in here to check the bookkeeping on a CPU

    def __init__(self):
        self.stamps = []

    def mark(self) -> None:
        event = self.Event(enable_timing=True)
        event.record()
        self.stamps.append(event)

    def read(self) -> list[float]:
        """Seconds between stamps; call after the device is synchronised (elapsed_time is in
        milliseconds)."""
        return [a.elapsed_time(b) / 1000 for a, b in zip(self.stamps, self.stamps[1:])]


def clock(device: torch.device):
    return CudaClock() if device.type == "cuda" else HostClock()


_hooks = None  # (epoch_start, batch_start), set by hooked() alone


@contextmanager
def hooked(epoch_start: Callable[[int], None], batch_start: Callable[[], None]):
    """Within it, epoch_start(epoch) is called as each EpochMeter starts, before its clock does,
    and batch_start() before each step's batch_start. Nothing in a run uses it; the bench makes
    arms that run side by side in one process take turns at the first and stops them at
    either. Nested, the inner pair is called for its time."""
    global _hooks
    outer, _hooks = _hooks, (epoch_start, batch_start)
    try:
        yield
    finally:
        _hooks = outer


class EpochMeter:
    """Wall time (device-synchronised) and process CPU time, data wait, images, step losses,
    step times and test metrics of one epoch. A step's time runs from the end of the step before
    to the end of this one (the epoch's first step: from its batch_start), so that whatever a
    framework does between two steps is in it; its data wait, the part of that between the end
    of the step before (the first: the epoch's start) and batch_start, is host time."""

    def __init__(
        self, device: torch.device, epoch: int, steps: StepCounter, flops: Optional[dict] = None
    ):
        self.device, self.epoch, self.steps, self.flops = device, epoch, steps, flops or {}
        if _hooks:
            _hooks[0](epoch)
        synchronize(device)
        reset_peak_memory(device)  # each epoch's CUDA peak is its own: the summary leaves out
        self.start = self.last = time.perf_counter()  # the warm-up's (cuDNN's autotuning)
        self.cpu_start = time.process_time()
        self.executed_at_start = steps.executed
        self.losses, self.images, self.waits, self.clock = [], 0, [], clock(device)
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
        if _hooks:
            _hooks[1]()
        self.waits.append(time.perf_counter() - self.last)
        if len(self.waits) == 1:  # the epoch's first step starts here, later ones where the
            self.clock.mark()  # step before them ended

    def step(self, loss: torch.Tensor, images: int) -> None:
        self.clock.mark()
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
        sums = torch.stack(
            [
                torch.where(keep, per_image, 0).sum(),
                (keep & (logits.argmax(1) == labels)).sum().float(),
                keep.sum().float(),
            ]
        )
        self.test_sums = sums if self.test_sums is None else self.test_sums + sums

    def finish(self, loss_scale) -> tuple[dict, list[float]]:
        """(epoch row, step losses), with the losses copied to the host in one transfer. With
        several ranks (every rank calls this), a step's loss is the mean of the ranks' losses,
        the test metrics cover the whole test set, images count the whole job's and peak memory
        is the largest rank's (each rank's is listed), and a step's time is the slowest rank's
        (the ranks meet at every step's gradient all-reduce)."""
        synchronize(self.device)
        epoch_time = time.perf_counter() - self.start
        world = distributed.size()
        losses, times = [], self.clock.read()
        if self.losses:
            losses = (distributed.sum_(torch.stack(self.losses).float()) / world).cpu().tolist()
            times = distributed.max_(torch.tensor(times, dtype=torch.float64)).tolist()
        finite = [v for v in losses if math.isfinite(v)]
        attempted = len(losses)
        test = [None, None]
        if self.test_sums is not None:
            loss_sum, correct, count = distributed.sum_(self.test_sums).cpu().tolist()
            test = [loss_sum / count, correct / count] if count else test
            if test[0] is not None and not math.isfinite(test[0]):  # non-finite logits:
                test[1] = None  # their argmax is no accuracy to report
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
            "data_wait_s": sum(self.waits),
            "peak_memory_bytes": max(peaks),
            **({"peak_memory_bytes_per_rank": peaks} if world > 1 else {}),
            "steps": attempted,
            "skipped_steps": attempted - (self.steps.executed - self.executed_at_start),
            "loss_scale": loss_scale,
            "step_clock": self.clock.name,
            "step_times_s": times,
            "step_waits_s": self.waits,
        }
        row.update(self._rates(row["images_per_s"]))
        if self.saved is not None:
            row["saved_tensors"] = self.saved.bytes
        return row, losses

    def _rates(self, images_per_s) -> dict:
        """The achieved TFLOP/s (FLOPs of an image x images/s) and the MFU (achieved over the
        devices' dense peak), None where either is not known."""
        per_image, peak = self.flops.get("per_image"), self.flops.get("peak_tflops")
        achieved = per_image * images_per_s / 1e12 if per_image and images_per_s else None
        return {
            "achieved_tflops": achieved,
            "mfu": achieved / peak if achieved is not None and peak else None,
        }


# Cross-entropy of a uniform guess over the 10 classes is ln 10 = 2.30; an epoch whose mean
# training loss is ten times that has learnt nothing and is moving away (lr 1e6 gave ~1e13).
LOSS_BOUND = 10 * math.log(10)
# A loss scale below 1 means the fp16 gradients overflow even unscaled: the scaler skips every
# step, and the run only looks alive.
SCALE_FLOOR = 1.0


def divergence(row: dict, losses: list[float]) -> str | None:
    """Why this epoch shows a diverged run, or None. One non-finite fp16 loss is routine (the
    scaler skips that step); a non-finite loss at the end of an epoch means it did not
    recover."""
    if losses and not math.isfinite(losses[-1]):
        finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
        first = (finite[-1] + 2) if finite else 1  # the step it stopped being finite, from 1
        return (
            f"loss is {losses[-1]} from step {first} of epoch {row['epoch']} "
            f"({len(losses)} steps) to its end"
        )
    if row["train_loss"] is not None and row["train_loss"] > LOSS_BOUND:
        return (
            f"mean training loss {row['train_loss']:.4g} in epoch {row['epoch']}, above "
            f"{LOSS_BOUND:.1f} (10 x ln 10, ten times a uniform guess's loss)"
        )
    if row["loss_scale"] is not None and row["loss_scale"] < SCALE_FLOOR:
        return (
            f"the loss scale fell to {row['loss_scale']:.3g} in epoch {row['epoch']}, below "
            f"{SCALE_FLOOR:g}: fp16 gradients overflow even unscaled"
        )
    return None
