"""Hugging Face Accelerate: the hand-written loop, with precision, device placement and the loss
scaler handled by Accelerator(mixed_precision=...), accelerator.prepare(...), .backward(...).

Run:    ampcompare accelerate --dataset synthetic --model small --epochs 2
Read:   sdiff -w 200 plain_torch/train.py accelerate_impl/train.py
Shows:  per-step losses and final weights bitwise identical to the plain loop at 32-true,
        bf16-mixed, bf16-true and 16-true (tests/test_accelerate.py, test_ladder.py); on a
        CPU, Accelerate asked for fp16 trains fp32 (no autocast, no scaler), so 16-mixed is
        refused there rather than misrecorded. Accelerate has no "true" mode: at bf16-true
        and 16-true this arm does what its users do, casting the model and the batches itself
        with mixed_precision="no". On GPUs, --strategy fsdp is Accelerate's FSDP2 plugin,
        given the blocks and the policy every arm gets (docs/fsdp.md: its own bf16 there is
        another mechanism), and trains plain FSDP's weights (tests/test_fsdp.py).
Where plain's lines live here:
    GradScaler; autocast            Accelerator(mixed_precision=...): it holds both;
                                    accelerator.autocast(), as prepare's own is not there
                                    under FSDP2
    .to(device) (the model)         accelerator.prepare; the batches are moved as in plain
    DistributedDataParallel(...)    accelerator.prepare, with the same DDP settings; the
                                    loaders are not prepared: they already give each rank
                                    its share, and Accelerate would shard them again
    sharding.shard (--strategy fsdp) FullyShardedDataParallelPlugin; accelerator.prepare
    scale(loss).backward()          accelerator.backward(loss)
    unscale_ + clip_grad_norm_      accelerator.clip_grad_norm_ (it unscales)
    scaler.step; scaler.update      optimizer.step(): the prepared optimizer's, skipped on
                                    inf/nan (accelerator.optimizer_step_was_skipped)
Measured: figures with their commands and machines are in docs/benchmark.md (every arm)
        and docs/bench.md (what a framework adds to a step), not here, where they would rot.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.utils import DistributedDataParallelKwargs

from accelerate_impl.precision import MIXED, refuse_unless, refuse_unless_sharding
from common import distributed, model_spec, models, sharding
from record.prepare import RunSetup, prepare
from record.results import RunResult


def build(cfg, setup: RunSetup):
    model = model_spec.build_model(cfg).to(memory_format=setup.memory_format)
    model.to(dtype=setup.policy.cast)  # no "true" mode in Accelerate: cast by hand, as users do
    fsdp = None
    if setup.sharded:  # FSDP2 on the blocks (its "transformer layers") and the root, under the
        # policy every arm gets: asked for bf16 itself, it would gather and reduce in bf16
        fsdp = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=sharding.unit_classes(model),
            mixed_precision_policy=sharding.policy(setup.policy.param_dtype),
            cpu_ram_efficient_loading=False,
        )
    accelerator = Accelerator(
        cpu=setup.device.type == "cpu",
        mixed_precision=MIXED[setup.policy.effective],
        # plain steps its schedule once per optimizer step, skipped (fp16) or not, and once
        # per step under DDP; Accelerate's default skips and steps once per process
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(**distributed.DDP_KWARGS)],
        fsdp_plugin=fsdp,
    )
    refuse_unless(accelerator, setup.policy.effective, setup.device.type)  # ours
    if setup.sharded:
        refuse_unless_sharding(accelerator)  # ours
    optimizer, scheduler = models.build_optimizer(cfg, model, setup.steps_per_epoch)
    if setup.resumed:
        if not setup.sharded:  # sharded: into the shards, once prepare has made them
            model.load_state_dict(setup.resumed["model"])
            optimizer.load_state_dict(setup.resumed["optimizer"])
        scheduler.load_state_dict(setup.resumed["scheduler"])
        if accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(setup.resumed["scaler"])
    if cfg.compile:  # the same in every arm: the common model, before any wrapper
        model = torch.compile(model)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if setup.resumed and setup.sharded:  # each rank takes its shards out of the full state
        weights, moments = setup.resumed["model"], setup.resumed["optimizer"]
        net = models.unwrapped(accelerator.unwrap_model(model))
        sharding.load_full_state(net, optimizer.optimizer, weights, moments)
    return accelerator, model, optimizer, scheduler


def fit(cfg, setup: RunSetup, accelerator, model, optimizer, scheduler) -> None:
    device, cast = accelerator.device, setup.policy.cast
    net = models.unwrapped(accelerator.unwrap_model(model))  # what is saved, as in every arm

    def save(path):  # accelerator.save_state would write a folder of files
        weights, moments = (
            sharding.full_state(net, optimizer.optimizer)
            if setup.sharded
            else (net.state_dict(), optimizer.state_dict())
        )
        scaler = accelerator.scaler
        torch.save(
            {
                "model": weights,
                "optimizer": moments,
                "scheduler": scheduler.state_dict(),
                **({"scaler": scaler.state_dict()} if scaler else {}),
                **setup.recorder.state(),
            },
            path,
        )

    for epoch in setup.epochs(cfg, optimizer.optimizer):  # measured, recorded, shown
        setup.train_loader.batch_sampler.sampler.set_epoch(epoch.number)
        model.train()
        for x, y in epoch.batches(setup.train_loader):
            x, y = x.to(device, cast, non_blocking=True), y.to(device, non_blocking=True)
            with accelerator.autocast(), epoch.measured(model):
                loss = models.cross_entropy(model(x), y)
            optimizer.zero_grad()
            accelerator.backward(loss)
            if cfg.clip_grad:
                accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            optimizer.step()
            scheduler.step()
            epoch.step_done(loss, len(y))
        model.eval()
        with torch.inference_mode(), accelerator.autocast():
            for x, y in epoch.test_batches(setup.test_loader):
                x, y = x.to(device, cast, non_blocking=True), y.to(device, non_blocking=True)
                epoch.evaluated(model(x), y)
        epoch.end(accelerator.scaler, net, save, save_is_collective=setup.sharded)


def train(cfg) -> RunResult:
    setup = prepare(cfg, impl="accelerate")
    # Any exception ends here, as the run's status (failed, oom, ...); a usage error, exit 2.
    with setup.recorder:
        accelerator, model, optimizer, scheduler = build(cfg, setup)
        fit(cfg, setup, accelerator, model, optimizer, scheduler)
    return setup.recorder.result
