"""Lightning Fabric: the hand-written loop, with precision, device placement and the loss
scaler handled by Fabric(precision=...) and fabric.setup(...), fabric.backward(...).

Run:    ampcompare fabric --dataset synthetic --model small --epochs 2
Read:   sdiff -w 200 plain_torch/train.py fabric_impl/train.py
Shows:  per-step losses and final weights bitwise identical to the plain loop at 32-true,
        bf16-mixed, 16-mixed, bf16-true and 16-true (tests/test_fabric.py, test_ladder.py),
        and what Fabric costs per step (ampcompare bench).
Where plain's lines live here:
    DistributedDataParallel(...)    Fabric(strategy=DDPStrategy(...)), the same DDP settings
    sharding.shard (--strategy fsdp) ModelParallelStrategy(parallelize_fn), one gathered file
    GradScaler; autocast            Fabric(precision=...): its plugin holds both
    .to(device) (model, batches)    fabric.setup, fabric.setup_dataloaders
    sampler.set_epoch(epoch)        Fabric's loader, as it is iterated, with its own count
    scale(loss).backward()          fabric.backward(loss)
    unscale_ + clip_grad_norm_      fabric.clip_gradients (the plugin unscales)
    scaler.step; scaler.update      optimizer.step(): the plugin's, skipped on inf/nan
    torch.save; load_state_dict     fabric.save; fabric.load (the scaler named in both)
Measured: figures with their commands and machines are in docs/benchmark.md (every arm)
        and docs/bench.md (what a framework adds to a step), not here, where they would rot.
"""

from __future__ import annotations

import torch
from lightning_fabric import Fabric
from lightning_fabric.plugins import MixedPrecision
from lightning_fabric.strategies import DDPStrategy, ModelParallelStrategy

from common import lightning_args, model_spec, models, precision as precisions, sharding
from record.prepare import RunSetup, prepare
from record.results import RunResult


def build(cfg, setup: RunSetup):
    # ours, the same for the Trainer: the CPU's fp16 plugin, DDP's pinned settings, FSDP2's
    # units (common/lightning_args.py)
    precision, plugins = lightning_args.precision(
        setup.policy, setup.device.type, MixedPrecision
    )
    strategy = lightning_args.strategy(
        setup.world,
        setup.sharded,
        DDPStrategy,
        ModelParallelStrategy,
        parallelize_fn=lambda model, mesh: sharding.shard(
            model, mesh["data_parallel"], setup.policy.param_dtype
        ),
    )
    fabric = Fabric(
        accelerator=setup.device.type,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=strategy,
        precision=precision,
        plugins=plugins,
    )
    fabric.launch()  # under torchrun or --devices N the processes exist already: no spawning
    chosen = fabric.strategy.precision.precision
    precisions.refuse_unless_ran("Fabric", chosen, setup.policy, setup.device.type)
    model = model_spec.build_model(cfg).to(memory_format=setup.memory_format)
    if cfg.compile:  # the same in every arm: the common model, before any wrapper
        model = torch.compile(model)
    # The model first, then its optimizer: under FSDP the parameters are new shards.
    model = fabric.setup_module(model)
    optimizer, scheduler = models.build_optimizer(cfg, model, setup.steps_per_epoch)
    optimizer = fabric.setup_optimizers(optimizer)
    scaler = fabric.strategy.precision.scaler if setup.policy.scaler else None
    # What a checkpoint holds, saved and loaded as one state; Fabric leaves the scaler out
    # unless it is named.
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    state |= {"scaler": scaler} if scaler else {}
    if setup.resumed:
        fabric.load(setup.recorder.checkpoint_path, state, strict=False, weights_only=True)
    return fabric, model, optimizer, state


def fit(cfg, setup: RunSetup, fabric, model, optimizer, state) -> None:
    train_loader, test_loader = fabric.setup_dataloaders(
        setup.train_loader, setup.test_loader, use_distributed_sampler=False
    )
    scheduler, scaler = state["scheduler"], state.get("scaler")

    def save(path):
        fabric.save(path, {**state, **setup.recorder.state()})

    for epoch in setup.epochs(cfg, optimizer.optimizer):  # measured, recorded, shown
        train_loader._num_iter_calls = epoch.number  # ours: Fabric's count, a resume's epoch
        model.train()
        for x, y in epoch.batches(train_loader):
            with epoch.measured(model):
                loss = models.cross_entropy(model(x), y)
            optimizer.zero_grad()
            fabric.backward(loss)
            if cfg.clip_grad:
                fabric.clip_gradients(
                    model, optimizer, max_norm=cfg.clip_grad, error_if_nonfinite=False
                )
            optimizer.step()
            scheduler.step()
            epoch.step_done(loss, len(y))
        model.eval()
        with torch.inference_mode():
            for x, y in epoch.test_batches(test_loader):
                epoch.evaluated(model(x), y)
        # fabric.save is a collective (rank 0 writes): every rank calls it
        epoch.end(scaler, model, save, save_is_collective=True)


def train(cfg) -> RunResult:
    setup = prepare(cfg, impl="fabric")
    # Any exception ends here, as the run's status (failed, oom, ...); a usage error, exit 2.
    with setup.recorder:
        fabric, model, optimizer, state = build(cfg, setup)
        fit(cfg, setup, fabric, model, optimizer, state)
    return setup.recorder.result
