"""FLOPs of one training step (forward and backward), counted once per run.

torch.utils.flop_counter.FlopCounterMode counts the matmuls and convolutions a step runs; on
the meta device it does so without computing anything. A model that cannot be built or run
there (its own code asks a tensor for a value, say) is counted on a real 2-image batch on the
CPU, scaled to the batch (matmul and convolution FLOPs grow with it linearly); one that runs on
neither gets no count, and the record says why, never a failed run.
BatchNorm, activations and the optimizer are left out, as MFU conventions do. What it counts
for our models is in docs/benchmark.md.
"""

from __future__ import annotations

import traceback
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import model_spec, models, peaks

SAMPLE = 2  # images in the CPU count


def of_run(cfg, precision: str, env: dict) -> dict:
    """FLOPs of one step of the whole job (or why there is no count), and the dense peak of all
    its devices together, which MFU is measured against (common/peaks.py)."""
    step, counted = per_step(model_spec.builder(model_spec.parse(cfg.model)), cfg.batch_size)
    peak, what = peaks.peak(env, precision)
    devices = env.get("world_size", 1)
    if peak is not None and devices > 1:
        peak, what = peak * devices, f"{devices} x {what}"
    return {
        "per_step": step,
        "per_image": step / cfg.batch_size if step else None,
        "batch_size": cfg.batch_size,
        "counted": counted,
        "peak_tflops": peak,
        "peak": what,
    }


def per_step(make: Callable, batch_size: int) -> tuple[Optional[int], str]:
    """(FLOPs of one step at batch_size, how they were counted, or why there is no count)."""
    try:
        return _count(make, batch_size, "meta"), "counted on the meta device"
    except Exception as meta:
        why_meta = _last_line(meta)
    try:
        with torch.random.fork_rng(devices=[]):
            flops = _count(make, SAMPLE, "cpu")
        return flops * batch_size // SAMPLE, (
            f"counted on {SAMPLE} images on the CPU, scaled "
            f"to the batch (on the meta device: {why_meta})"
        )
    except Exception as cpu:
        return None, f"not counted: on the meta device {why_meta}; on the CPU {_last_line(cpu)}"


def _count(make: Callable, batch: int, device: str) -> int:
    with torch.device(device):
        model = make()
        x = torch.randn(batch, 3, 32, 32) if device == "cpu" else torch.empty(batch, 3, 32, 32)
        y = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        models.cross_entropy(model(x), y).backward()
    return counter.get_total_flops()


def _last_line(e: BaseException) -> str:
    return traceback.format_exception_only(type(e), e)[-1].strip()
