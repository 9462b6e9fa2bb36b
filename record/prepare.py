"""Everything before the loop that is identical for every implementation: validation, device,
precision policy, speed switches, data loaders and the (not yet created) run record.
Usage and environment errors surface here, before anything is written to --out-dir."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader

from common import console, data, distributed, flops, model_spec, precision
from record import epochs, rundir
from common.device import apply_speed_switches, resolve_device
from record.environment import environment
from common.errors import UsageError
from record.endings import out_of_memory
from record.recorder import Recorder


@dataclass
class RunSetup:
    """What a loop needs before its first step; each train.py builds its model and loop on
    it."""

    device: torch.device
    policy: precision.Policy
    switches: dict
    train_loader: DataLoader
    test_loader: DataLoader
    steps_per_epoch: int
    test_steps: int
    recorder: Recorder
    world: distributed.World
    flops: dict  # of a step, and the peak MFU is measured against (common/flops.py)
    sharded: bool = False  # --strategy fsdp: the model is sharded over the ranks (FSDP2)

    def epochs(self, cfg, optimizer) -> Iterator[epochs.Epoch]:
        """The run's epochs, each measured, recorded and shown the same in every arm."""
        return epochs.epochs(self, cfg, optimizer)

    @property
    def memory_format(self) -> torch.memory_format:
        return (
            torch.channels_last if self.switches["channels_last"] else torch.contiguous_format
        )

    @property
    def ddp_device_ids(self) -> Optional[list[int]]:
        """DistributedDataParallel's device_ids: this process's GPU, or None on a CPU."""
        return [self.device.index] if self.device.type == "cuda" else None

    @property
    def mesh(self):
        """The data-parallel device mesh FSDP2 shards over: every rank of the job."""
        from torch.distributed.device_mesh import init_device_mesh  # only where it shards

        return init_device_mesh(self.device.type, (self.world.size,))

    @property
    def resumed(self) -> Optional[dict]:
        """The checkpoint this run continues from (--resume), or None."""
        return self.recorder.resumed


def prepare(cfg, impl: str, opt_level: Optional[str] = None, policy=None) -> RunSetup:
    cfg.validate()
    checked = model_spec.check(cfg.model, cfg.seed)  # a model that cannot train here: one line
    torch.manual_seed(cfg.seed)  # anything random in a run draws from (seed, ...) alone
    rundir.check_out_dir(cfg.resume or cfg.out_dir, "--resume" if cfg.resume else "--out-dir")
    device = resolve_device(cfg)
    if cfg.devices * cfg.num_nodes > 1 and not distributed.launched():
        raise UsageError(
            f"--devices {cfg.devices} --num-nodes {cfg.num_nodes}: start it from "
            f"the command line (it launches the processes) or under torchrun"
        )
    world = distributed.world(cfg, device)
    distributed.init(world)
    notes = []
    if policy is None:
        policy, notes = precision.resolve(cfg.precision, device)
    distributed.check_reduces(world, policy.cast, device)
    switches = apply_speed_switches(cfg, device)
    try:
        train_loader, test_loader = data.loaders(
            cfg, _load(cfg, world), device, switches["channels_last"], world.rank, world.size
        )
    except Exception as e:
        if not out_of_memory(type(e), e):
            raise
        raise UsageError(
            f"not enough memory for the data: {data.describe_memory(cfg)} "
            f"({str(e).splitlines()[0]}); use a smaller --synthetic-size, or "
            f"free memory"
        ) from None
    test_steps = min(len(test_loader), cfg.limit_test_batches or len(test_loader))
    env = {
        **environment(device, switches),
        "data_on_device_bytes": data.device_bytes(train_loader, test_loader),
    }
    recorder = Recorder(cfg, impl, policy, device, env, opt_level, world, checked.to_dict())
    # The precision's warnings once nothing here can refuse the run: a refusal is one line
    for line in notes if world.is_rank0 else ():
        console.say(f"ampcompare: warning: {line}", err=True)
    run_flops = flops.of_run(cfg, recorder.result.precision.effective, recorder.result.env)
    recorder.result.flops = run_flops
    # Where a framework builds its loader iterator before it calls set_epoch (Lightning, on
    # resume), the order must already be the resumed epoch's.
    train_loader.batch_sampler.sampler.set_epoch(recorder.start_epoch)
    return RunSetup(
        device,
        policy,
        switches,
        train_loader,
        test_loader,
        data.steps_per_epoch(cfg, train_loader),
        test_steps,
        recorder,
        world,
        run_flops,
        cfg.strategy == "fsdp",
    )


def _load(cfg, world):
    """The data sets. Under an external torchrun one process per node downloads CIFAR-10 while
    the others wait, as long as the download takes (`ampcompare <arm> --devices N` has fetched
    it before the launch). A local rank 0 that fails ends the job: the launcher stops all."""
    if world.size == 1 or cfg.dataset != "cifar10" or not cfg.download:
        return data.load(cfg)
    if world.local_rank == 0:
        sets = data.load(cfg)
    # Not the job's group: its timeout is for a dead peer, not for a slow download.
    waiting = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(hours=6))
    torch.distributed.barrier(group=waiting)
    torch.distributed.destroy_process_group(waiting)
    return sets if world.local_rank == 0 else data.load(cfg)
