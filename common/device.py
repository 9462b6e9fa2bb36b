"""Device choice and every switch that changes speed, set once here for every loop."""

from __future__ import annotations

import ctypes
import os

import torch

from common import ranks
from common.errors import Unavailable


def resolve_device(cfg) -> torch.device:
    """The device of this process: the CPU, or its own GPU (LOCAL_RANK among several)."""
    if cfg.accelerator == "cuda" and not torch.cuda.is_available():
        raise Unavailable(
            "--accelerator cuda: no CUDA device is available here; use --accelerator cpu"
        )
    if cfg.accelerator == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if cfg.devices > torch.cuda.device_count():
        raise Unavailable(
            f"--devices {cfg.devices}: this machine has {torch.cuda.device_count()} GPU(s)"
        )
    index = int(os.environ["LOCAL_RANK"]) if ranks.launched() else torch.cuda.current_device()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def apply_speed_switches(cfg, device: torch.device) -> dict:
    """Set cudnn.benchmark, TF32, determinism; return them (and channels_last) for the record.
    Lightning's Trainer(benchmark=..., deterministic=...) gets the same values from here."""
    cuda = device.type == "cuda"
    switches = {
        "steady_malloc": steady_malloc(),
        "cudnn_benchmark": cuda and not cfg.deterministic,
        # TF32 exists from Ampere (8.0) on; earlier GPUs would record a switch that did nothing.
        "tf32": bool(cfg.tf32 and cuda and torch.cuda.get_device_capability(device) >= (8, 0)),
        # NHWC lets cuDNN use tensor-core kernels without transposes; on CPU it bought nothing.
        # FSDP2 shards contiguous parameters only: channels-last is off by default there
        "channels_last": (
            cuda and cfg.strategy != "fsdp" if cfg.channels_last is None else cfg.channels_last
        ),
        "deterministic": cfg.deterministic,
        "compile": cfg.compile,
    }
    torch.backends.cudnn.benchmark = switches["cudnn_benchmark"]
    torch.backends.cuda.matmul.allow_tf32 = switches["tf32"]
    torch.backends.cudnn.allow_tf32 = switches["tf32"]
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(cfg.deterministic)
    return switches


# glibc's mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def steady_malloc() -> bool:
    """Keep freed memory in the process instead of handing it back to the system (glibc: no
    mmap'd chunks, no trimming). Otherwise glibc's mmap threshold moves with whatever the
    process allocated and freed before (importing Lightning, say), and a step's large CPU
    tensors are mmap'd and page-faulted in afresh each step in one arm and not in another
    (what that cost, measured: docs/benchmark.md, "The same allocator for every arm"). Whether
    it took effect is recorded (False off glibc)."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
        )
    except (OSError, AttributeError):
        return False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
