"""Model-state memory: the bytes a run keeps from one step to the next, beside the activations a
step saves (activations.py). Counted from the tensors themselves, so on any device:

    parameters   the model's weights and biases, in whatever type the rung keeps them
    gradients    their .grad tensors
    optimizer    the optimizer's state (Adam's two moments and its step counts)
    master       weights a framework keeps beside the model's in another type, with their
                 gradients: the optimizer's parameters that are not the model's (apex O2's
                 fp32 master weights)
    scaler       a GradScaler's scale and growth tracker

Each storage is counted once, at its full size (a view shares its base's; a bucket of gradients
that DDP lays out as views is one storage), on whichever part finds it first. Under FSDP a
rank keeps its shards only, and they are what is counted: the state per rank.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from common import sharding

PARTS = ("parameters", "gradients", "optimizer", "master", "scaler")


def bytes_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """{part: bytes} for PARTS but the scaler, with each storage counted once."""
    size = _sizer(set())
    params = list(model.parameters())
    held = [p for group in optimizer.param_groups for p in group["params"]]
    parts = {
        "parameters": size(params),
        "gradients": size(p.grad for p in params),
        "optimizer": size(v for state in optimizer.state.values() for v in state.values()),
    }
    parts["master"] = size(held) + size(p.grad for p in held)  # only what the model lacks
    return parts


def scaler_bytes(scaler) -> int:
    """A GradScaler's tensors (none until its first step, or when disabled); 0 for anything
    else (apex's scaler keeps a Python number)."""
    return _sizer(set())(getattr(scaler, name, None) for name in ("_scale", "_growth_tracker"))


def _sizer(seen: set):
    def size(tensors: Iterable[Optional[torch.Tensor]]) -> int:
        total = 0
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            t = sharding.local(t)  # a sharded tensor: this rank's shard, all it keeps
            storage = t.untyped_storage()
            key = (t.device, storage.data_ptr(), storage.nbytes())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        return total

    return size
