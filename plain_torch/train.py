"""Plain PyTorch: the CIFAR-10 loop written by hand, mixed precision with torch.autocast and
torch.amp.GradScaler as switches (enabled=...), not as a second code path.

Run:    ampcompare plain --dataset synthetic --model small --epochs 2
Read:   diff plain_torch/train.py lightning_impl/train.py   (or apex_impl/train.py)
Shows:  the reference loop the other two are measured against; per-step losses and final
        weights are bitwise identical to Lightning's at 32-true, bf16-mixed and 16-mixed.
Measured: small CNN, batch 256, 10k synthetic images, 2-core AMD EPYC CPU, torch 2.14.1:
        6.61 s/epoch at 32-true, 3.27 s at bf16-mixed (README, "A real comparison").
"""
from __future__ import annotations

from itertools import islice

import torch

from common import metrics, models, progress
from common.prepare import Run, prepare
from common.results import RunResult


def build(cfg, run: Run):
    model = models.build_model(cfg).to(run.device, memory_format=run.memory_format)
    optimizer, scheduler = models.build_optimizer(cfg, model, run.steps_per_epoch)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.policy.scaler)  # apex: amp.initialize(...); lightning: MixedPrecision plugin
    return model, optimizer, scheduler, scaler


def fit(cfg, run: Run, model, optimizer, scheduler, scaler) -> None:
    device = run.device
    autocast = torch.autocast(device.type, dtype=run.policy.dtype, enabled=run.policy.autocast)  # lightning: precision plugin
    steps = metrics.StepCounter(optimizer)
    with progress.Bar(cfg, run.steps_per_epoch) as bar:
        for epoch in range(cfg.epochs):
            run.train_loader.batch_sampler.sampler.set_epoch(epoch)  # lightning: the Trainer calls set_epoch
            meter = metrics.EpochMeter(device, epoch, steps)
            bar.epoch(epoch)
            model.train()
            for x, y in islice(run.train_loader, run.steps_per_epoch):
                meter.batch_start()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with autocast:
                    loss = models.cross_entropy(model(x), y)
                optimizer.zero_grad()
                scaler.scale(loss).backward()  # apex: amp.scale_loss(loss, optimizer); lightning: the Trainer
                scaler.unscale_(optimizer)  # unscaled gradients for clipping; lightning always unscales here too
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                scaler.step(optimizer)  # skipped when the gradients hold inf/nan
                scaler.update()
                scheduler.step()
                meter.step(loss, len(y))
                bar.advance()
            meter.train_done()
            model.eval()
            with torch.inference_mode(), autocast:
                for x, y in islice(run.test_loader, run.test_steps):
                    meter.eval_batch(model(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
            row, losses = meter.finish(scaler.get_scale() if scaler.is_enabled() else None)
            run.recorder.add_epoch(row, losses)
            bar.info(row)
            metrics.check_diverged(losses)


def train(cfg) -> RunResult:
    run = prepare(cfg, impl="plain")
    model, optimizer, scheduler, scaler = build(cfg, run)
    with run.recorder:
        fit(cfg, run, model, optimizer, scheduler, scaler)
    return run.recorder.close(model, optimizer=optimizer.state_dict(), scaler=scaler.state_dict())
