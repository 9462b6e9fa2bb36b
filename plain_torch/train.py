"""Plain PyTorch: the CIFAR-10 loop written by hand, mixed precision with torch.autocast and
torch.amp.GradScaler as switches (enabled=...), not as a second code path.

Run:    ampcompare plain --dataset synthetic --model small --epochs 2
Read:   sdiff -w 200 plain_torch/train.py fabric_impl/train.py   (accelerate_impl, apex_impl);
        the loop against Lightning's hooks: sdiff -W -w 200 plain_torch/train.py
        lightning_impl/module.py. Each of those files' headers says where this loop's lines
        live there.
Shows:  the reference loop the others are measured against; per-step losses and final
        weights are bitwise identical to Lightning's at 32-true, bf16-mixed and 16-mixed, and
        to every arm's at bf16-true and 16-true (the model and its inputs cast to the half
        type, the optimizer built on the half parameters, no scaler); under --strategy fsdp,
        to Lightning's and Fabric's ModelParallelStrategy (docs/fsdp.md).
Measured: figures with their commands and machines are in docs/benchmark.md (every arm)
        and docs/bench.md (what a framework adds to a step), not here, where they would rot.
"""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from common import distributed, model_spec, models, sharding
from record.prepare import RunSetup, prepare
from record.results import RunResult


def build(cfg, setup: RunSetup):
    model = model_spec.build_model(cfg).to(setup.device, memory_format=setup.memory_format)
    model.to(dtype=setup.policy.cast)  # bf16-true, 16-true: the model half, so its state too
    if setup.sharded:  # fully_shard each block, then the root: the optimizer gets the shards
        sharding.shard(model, setup.mesh, setup.policy.param_dtype)
    optimizer, scheduler = models.build_optimizer(cfg, model, setup.steps_per_epoch)
    scaler = torch.amp.GradScaler(setup.device.type, enabled=setup.policy.scaler)
    if setup.resumed:
        weights, moments = setup.resumed["model"], setup.resumed["optimizer"]
        if setup.sharded:  # each rank takes its shards out of the full state
            sharding.load_full_state(model, optimizer, weights, moments)
        else:
            model.load_state_dict(weights)
            optimizer.load_state_dict(moments)
        scheduler.load_state_dict(setup.resumed["scheduler"])
        scaler.load_state_dict(setup.resumed["scaler"])
    if cfg.compile:  # the same in every arm: the common model, before any wrapper
        model = torch.compile(model)
    if setup.world.size > 1 and not setup.sharded:
        model = DistributedDataParallel(
            model, device_ids=setup.ddp_device_ids, **distributed.DDP_KWARGS
        )
    return model, optimizer, scheduler, scaler


def fit(cfg, setup: RunSetup, model, optimizer, scheduler, scaler) -> None:
    device, cast = setup.device, setup.policy.cast  # a true rung casts the inputs too
    autocast = torch.autocast(
        device.type, dtype=setup.policy.dtype, enabled=setup.policy.autocast
    )
    net = models.unwrapped(model)  # without DDP's or compile's wrapper: what is saved

    def save(path):  # sharded: a collective, the full state gathered on rank 0
        weights, moments = (
            sharding.full_state(net, optimizer)
            if setup.sharded
            else (net.state_dict(), optimizer.state_dict())
        )
        torch.save(
            {
                "model": weights,
                "optimizer": moments,
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                **setup.recorder.state(),
            },
            path,
        )

    for epoch in setup.epochs(cfg, optimizer):  # measured, recorded, shown (record/epochs.py)
        setup.train_loader.batch_sampler.sampler.set_epoch(epoch.number)
        model.train()
        for x, y in epoch.batches(setup.train_loader):
            x, y = x.to(device, cast, non_blocking=True), y.to(device, non_blocking=True)
            with autocast, epoch.measured(model):
                loss = models.cross_entropy(model(x), y)
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            scaler.step(optimizer)  # skipped when the gradients hold inf/nan
            scaler.update()
            scheduler.step()
            epoch.step_done(loss, len(y))
        model.eval()
        with torch.inference_mode(), autocast:
            for x, y in epoch.test_batches(setup.test_loader):
                x, y = x.to(device, cast, non_blocking=True), y.to(device, non_blocking=True)
                epoch.evaluated(model(x), y)
        epoch.end(scaler, net, save, save_is_collective=setup.sharded)


def train(cfg) -> RunResult:
    setup = prepare(cfg, impl="plain")
    # Any exception ends here, as the run's status (failed, oom, ...); a usage error, exit 2.
    with setup.recorder:
        model, optimizer, scheduler, scaler = build(cfg, setup)
        fit(cfg, setup, model, optimizer, scheduler, scaler)
    return setup.recorder.result
