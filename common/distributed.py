"""Several processes on torch.distributed: which one this is, the process group, DDP's settings,
and the few collectives the measurements need. One process (the default) needs none of it.

Every arm runs under the torchelastic environment (RANK, LOCAL_RANK, WORLD_SIZE, ...), which
`ampcompare <arm> --devices N` sets up by starting N local processes with torch's elastic
launcher, and which an external `torchrun` sets up the same way (that is how several nodes are
used). The group is initialised here, the same way for every arm: Lightning and Fabric find it
initialised and use it. Backend: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from common import ranks
from common.errors import Unavailable, UsageError

# DDP's gradient buckets decide the order of the all-reduce sums: with 3 ranks, another
# bucket_cap_mb changed losses by up to 5e-7. Every arm passes these.
DDP_KWARGS = {
    "bucket_cap_mb": 25,
    "gradient_as_bucket_view": False,
    "find_unused_parameters": False,
}
# A collective that waits longer than this for a dead peer fails instead of hanging.
TIMEOUT = datetime.timedelta(seconds=120)


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1
    backend: Optional[str] = None

    @property
    def is_rank0(self) -> bool:
        """Rank 0: the one process that writes result.json, the checkpoint and the progress."""
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return self.size // self.local_size

    def to_dict(self) -> dict:
        return {"world_size": self.size, "nodes": self.nodes, "backend": self.backend}


def launched() -> bool:
    """Whether this process is one of several started by torchrun or `--devices N`."""
    return ranks.launched()


def world(cfg, device: torch.device) -> World:
    """This process's place in the job, checked against --devices and --num-nodes."""
    if not launched():  # one process: a group of one only for FSDP, which shards over a mesh
        return World(backend=backend_for(device) if cfg.strategy == "fsdp" else None)
    env = {}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        try:
            env[k] = int(os.environ[k])
        except ValueError:
            raise UsageError(
                f"{k}={os.environ[k]!r}: the launcher's variables must be numbers"
            ) from None
    if (
        env["LOCAL_WORLD_SIZE"] != cfg.devices
        or env["WORLD_SIZE"] != cfg.devices * cfg.num_nodes
    ):
        raise UsageError(
            f"the launcher started {env['LOCAL_WORLD_SIZE']} processes per node, "
            f"{env['WORLD_SIZE']} in all; --devices {cfg.devices} --num-nodes "
            f"{cfg.num_nodes} asks for {cfg.devices} and "
            f"{cfg.devices * cfg.num_nodes}"
        )
    return World(
        env["RANK"],
        env["LOCAL_RANK"],
        env["WORLD_SIZE"],
        env["LOCAL_WORLD_SIZE"],
        backend_for(device),
    )


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init(w: World) -> None:
    """Join the process group (once, before any framework would)."""
    if w.backend is None or dist.is_initialized():
        return
    if w.size == 1:  # FSDP in one process: a group of one, with nothing to meet
        dist.init_process_group(w.backend, store=dist.HashStore(), rank=0, world_size=1)
        return
    try:
        threads = ranks.threads()
    except ValueError as e:
        raise UsageError(str(e)) from None
    if threads:  # torchrun sets 1, `--devices N` cpu_count // N: the same for every arm
        torch.set_num_threads(threads)
    try:
        dist.init_process_group(w.backend, timeout=TIMEOUT)
    except (RuntimeError, ValueError) as e:  # a rendezvous port taken, an unreachable master
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise UsageError(
            f"cannot join the process group at {where} ({str(e).splitlines()[0]});"
            f" is the port in use? give the launcher another one"
        ) from None


def check_reduces(w: World, dtype, device: torch.device) -> None:
    """At a true rung the gradients DDP all-reduces are in the half type, and a backend may
    lack collectives for it (gloo and bf16: pytorch#111131). Try one first, every rank alike,
    and refuse in one line where it fails, never a traceback from inside a framework."""
    if w.size == 1 or dtype is None:
        return
    try:
        dist.all_reduce(torch.zeros(1, dtype=dtype, device=device))
    except (RuntimeError, ValueError, TypeError) as e:
        raise Unavailable(
            f"the {w.backend} backend cannot all-reduce {dtype} tensors here "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}): a true rung's "
            f"gradients are {dtype}; run it in one process, or at a mixed rung"
        ) from None


ENDINGS = ".ranks"  # in the run folder: how each rank of the job ended, for its launcher


def mark_ending(run_dir: str, rank: int, status: str, error, signal) -> None:
    """Leave how this rank ended (and when, and by which signal) where the launcher that
    started the job reads it: which rank ended first, and why, is what its record must say."""
    if not os.path.isdir(run_dir):
        return
    folder = os.path.join(run_dir, ENDINGS)
    try:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{rank}.json")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(
                {
                    "run": os.environ.get("TORCHELASTIC_RUN_ID"),
                    "rank": rank,
                    "status": status,
                    "error": error,
                    "signal": signal,
                    "time": time.time(),
                },
                f,
            )
        os.replace(path + ".tmp", path)
    except OSError:
        pass  # a full disk: the launcher still has the exit codes


def read_endings(run_dir: str, run: str) -> dict:
    """{rank: ending} that the ranks of job `run` left; the folder goes with them."""
    folder, out = os.path.join(run_dir, ENDINGS), {}
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                ending = json.load(f)
            if ending.get("run") == run:
                out[int(ending["rank"])] = ending
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            continue
    shutil.rmtree(folder, ignore_errors=True)
    return out


def shutdown() -> None:
    """Leave the process group before the process exits: torch's own threads for it, destroyed
    with the interpreter instead, could end a finished rank with SIGABRT ("terminate called
    without an active exception")."""
    if dist.is_initialized():
        dist.destroy_process_group()


def size() -> int:
    """The number of ranks in the job (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over all ranks (the tensor itself in one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def max_(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum over all ranks (the tensor itself in one process), returned on
    the CPU. NCCL reduces tensors on the GPU only, gloo those on the CPU."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )
        tensor = tensor.to(device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.cpu()
    return tensor


def gather_ints(value: int, device: torch.device) -> list[int]:
    """One int from every rank, in rank order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    out = [
        torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())
    ]
    dist.all_gather(out, torch.tensor([value], dtype=torch.long, device=device))
    return [int(t.item()) for t in out]
