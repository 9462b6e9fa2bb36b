"""What machine and software a run was measured on: versions, device, CPU, git commit.

Written into every result.json as `env`, so that a number can be read with the hardware and
software that produced it."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
from typing import Optional

import torch

from record import framework_env


def version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpuinfo(field: str) -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_bf16() -> bool:
    """Whether the CPU computes bf16 dot products natively (AVX-512 BF16 or AMX), which is what
    makes bf16-mixed faster than fp32 on a CPU."""
    flags = set((_cpuinfo("flags") or "").split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def git_commit() -> Optional[str]:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0 or not head.stdout.strip():
        return None
    # "+dirty": the numbers came from code that differs from the commit named.
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment(device: torch.device, switches: dict) -> dict:
    import torchvision  # where used, as in common/data.py

    cuda = device.type == "cuda"
    capability = torch.cuda.get_device_capability(device) if cuda else None
    cpu = cpu_model()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": version("pytorch-lightning") or version("lightning"),
        "accelerate": version("accelerate"),
        "apex": version("apex"),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu,
        "cuda_capability": f"{capability[0]}.{capability[1]}" if capability else None,
        # Tensor cores arrived with Volta (7.0): the usual reason fp16 gains more on a T4 than a
        # P40.
        "tensor_cores": capability >= (7, 0) if capability else False,
        "cpu_model": cpu,
        "cpu_bf16": cpu_bf16(),
        "threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "host": platform.node(),
        "pid": os.getpid(),
        # With host and pid, when this process began: a run's identity, so that a run found in
        # two folders (a copy) counts once in a report.
        "started": round(time.time(), 6),
        # What the frameworks would have read from the environment, taken out before the run
        # (record/framework_env.py): the run trained as if they were never set.
        "cleared_environment": framework_env.inherited(),
        **switches,
    }
