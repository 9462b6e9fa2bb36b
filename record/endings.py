"""How a run ended, as the status and error its record says: a pure function of the exception
(or none) and whether a signal came, and the words for each kind of failure."""

from __future__ import annotations

import os
import resource
from typing import Optional

import torch

from common.metrics import Diverged
from record.rundir import DISK_FULL

OOM = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError)


def out_of_memory(kind, exc) -> bool:
    """An allocation that failed: torch's own error, Python's, or the CPU allocator's, which
    torch raises as a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    return issubclass(kind, OOM) or (
        issubclass(kind, RuntimeError) and "can't allocate memory" in str(exc)
    )


def ending(
    kind, exc, signalled: bool, batch_size: int, memory: str = "", saved: bool = True
) -> tuple[str, Optional[str]]:
    """(status, error) of a run whose loop ended with exception `kind` (None: it finished).
    A signal makes it interrupted whatever surfaced first: with several ranks, a peer that
    stopped on the same signal can surface here as a failed collective. saved: whether the
    record names a checkpoint (one whole epoch is saved)."""
    if kind is None:
        return "ok", None
    if issubclass(kind, KeyboardInterrupt) or signalled:
        return "interrupted", None
    if out_of_memory(kind, exc):
        return "oom", f"out of memory at batch size {batch_size}: {exc} ({memory})"
    if issubclass(kind, Diverged):
        return "diverged", str(exc)
    if issubclass(kind, OSError) and exc.errno in DISK_FULL:
        kept = (
            "the last complete checkpoint and record are kept"
            if saved
            else "no checkpoint had been written yet; the record is kept"
        )
        return "failed", (
            f"disk full ({exc.strerror}) while writing {exc.filename or 'a file'}; {kept}"
        )
    return "failed", f"{kind.__name__}: {exc}"


def memory_figures(device: torch.device) -> str:
    """What the process had when memory ran out: the allocator's peak and the device's total on
    a GPU, the peak RSS and the RAM on a CPU."""
    mib = 1 << 20
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        return (
            f"allocator peak {torch.cuda.max_memory_allocated(device) / mib:.0f} MiB of "
            f"{total / mib:.0f} MiB on {torch.cuda.get_device_name(device)}"
        )
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return f"process peak RSS {peak / mib:.0f} MiB of {total / mib:.0f} MiB RAM"
