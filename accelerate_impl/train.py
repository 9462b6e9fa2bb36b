"""Hugging Face Accelerate: the hand-written loop, with precision, device placement and the loss
scaler handled by Accelerator(mixed_precision=...), accelerator.prepare(...), .backward(...).

Run:    ampcompare accelerate --dataset synthetic --model small --epochs 2
Read:   sdiff -w 200 plain_torch/train.py accelerate_impl/train.py
Shows:  per-step losses and final weights bitwise identical to the plain loop at 32-true and
        bf16-mixed (tests/test_accelerate.py); on a CPU, Accelerate asked for fp16 trains
        fp32 (no autocast, no scaler), so 16-mixed is refused there rather than misrecorded.
Measured: figures with their commands and machines are in docs/benchmark.md (every arm)
        and docs/bench.md (what a framework adds to a step), not here, where they would rot.
"""

from __future__ import annotations

from itertools import islice

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

from accelerate_impl.precision import MIXED, refuse_unless
from common import distributed, metrics, model_spec, models, progress
from record.prepare import RunSetup, prepare
from record.results import RunResult


def build(cfg, setup: RunSetup):
    # plain: torch.autocast + torch.amp.GradScaler; fabric: Fabric(precision=...)
    accelerator = Accelerator(
        cpu=setup.device.type == "cpu",
        mixed_precision=MIXED[setup.policy.effective],
        # plain steps its schedule once per optimizer step, skipped (fp16) or not, and once
        # per step under DDP; Accelerate's default skips and steps once per process
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(**distributed.DDP_KWARGS)],
    )
    # lightning, fabric: the precision plugin read back; here what the Accelerator will do
    refuse_unless(accelerator, setup.policy.effective, setup.device.type)
    # plain: .to(device) here; accelerator.prepare moves the model itself
    model = model_spec.build_model(cfg).to(memory_format=setup.memory_format)
    optimizer, scheduler = models.build_optimizer(cfg, model, setup.steps_per_epoch)
    if setup.resumed:  # plain: the same load_state_dict calls; fabric: fabric.load(...)
        model.load_state_dict(setup.resumed["model"])
        optimizer.load_state_dict(setup.resumed["optimizer"])
        scheduler.load_state_dict(setup.resumed["scheduler"])
        if accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(setup.resumed["scaler"])
    if cfg.compile:  # the same in every arm: the common model, before any wrapper
        model = torch.compile(model)
    # plain: DistributedDataParallel(model, ...) with several processes; the loaders are not
    # prepared: Accelerate would shard their batches again (BatchSamplerShard) under DDP, and
    # they already give each rank its share in the common (seed, epoch) order
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return accelerator, model, optimizer, scheduler


def fit(cfg, setup: RunSetup, accelerator, model, optimizer, scheduler) -> None:
    device = accelerator.device
    # plain: torch.autocast; here the model accelerator.prepare returned runs in its autocast
    # (and skipped fp16 steps are accelerator.optimizer_step_was_skipped; counted alike here)
    steps = metrics.StepCounter(optimizer.optimizer)
    net = models.unwrapped(accelerator.unwrap_model(model))  # what is saved, as in every arm

    def save(path):  # plain: the same; accelerator.save_state would write a folder of files
        scaler = accelerator.scaler
        torch.save(
            {
                "model": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                **({"scaler": scaler.state_dict()} if scaler else {}),
                **setup.recorder.state(),
            },
            path,
        )

    with progress.Bar(progress.enabled(cfg)) as bar:
        for epoch in range(setup.recorder.start_epoch, cfg.epochs):
            # lightning: the Trainer calls set_epoch on the sampler itself
            setup.train_loader.batch_sampler.sampler.set_epoch(epoch)
            meter = setup.meter(epoch, steps)
            bar.task(f"epoch {epoch}", setup.steps_per_epoch)
            model.train()
            for x, y in islice(setup.train_loader, setup.steps_per_epoch):
                meter.batch_start()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with meter.saved_tensors(model):  # measures the run's first step
                    loss = models.cross_entropy(model(x), y)
                optimizer.zero_grad()
                accelerator.backward(loss)  # plain: scaler.scale(loss).backward()
                if cfg.clip_grad:  # plain: scaler.unscale_ + clip_grad_norm_; it unscales
                    accelerator.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                optimizer.step()  # plain: scaler.step + scaler.update; skipped on inf/nan
                scheduler.step()
                meter.step(loss, len(y))
                bar.advance()
            meter.train_done()
            model.eval()
            with torch.inference_mode():  # plain: inference_mode + autocast
                for x, y in islice(setup.test_loader, setup.test_steps):
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    meter.eval_batch(model(x), y)
            scale = accelerator.scaler.get_scale() if accelerator.scaler else None
            row, losses = meter.finish(scale)
            setup.recorder.end_epoch(row, losses, net, save)  # also checks for divergence
            bar.update(info=progress.epoch_info(row))


def train(cfg) -> RunResult:
    setup = prepare(cfg, impl="accelerate")
    # Any exception ends here, as the run's status (failed, oom, ...); a usage error, exit 2.
    with setup.recorder:
        accelerator, model, optimizer, scheduler = build(cfg, setup)
        fit(cfg, setup, accelerator, model, optimizer, scheduler)
    return setup.recorder.result
