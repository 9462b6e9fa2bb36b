"""Plain PyTorch: the CIFAR-10 loop written by hand, mixed precision with torch.autocast and
torch.amp.GradScaler as switches (enabled=...), not as a second code path.

Run:    ampcompare plain --dataset synthetic --model small --epochs 2
Read:   sdiff -w 200 plain_torch/train.py fabric_impl/train.py   (accelerate_impl, apex_impl);
        the loop against Lightning's hooks: sdiff -W -w 200 plain_torch/train.py
        lightning_impl/module.py
Shows:  the reference loop the others are measured against; per-step losses and final
        weights are bitwise identical to Lightning's at 32-true, bf16-mixed and 16-mixed.
Measured: figures with their commands and machines are in docs/benchmark.md (every arm)
        and docs/bench.md (what a framework adds to a step), not here, where they would rot.
"""

from __future__ import annotations

from itertools import islice

import torch
from torch.nn.parallel import DistributedDataParallel

from common import distributed, metrics, model_spec, models, progress
from record.prepare import RunSetup, prepare
from record.results import RunResult


def build(cfg, setup: RunSetup):
    model = model_spec.build_model(cfg).to(setup.device, memory_format=setup.memory_format)
    optimizer, scheduler = models.build_optimizer(cfg, model, setup.steps_per_epoch)
    # apex: amp.initialize(model, optimizer); lightning: the MixedPrecision plugin's scaler
    scaler = torch.amp.GradScaler(setup.device.type, enabled=setup.policy.scaler)
    if setup.resumed:  # apex: amp.load_state_dict; lightning: Trainer.fit(ckpt_path=...)
        model.load_state_dict(setup.resumed["model"])
        optimizer.load_state_dict(setup.resumed["optimizer"])
        scheduler.load_state_dict(setup.resumed["scheduler"])
        scaler.load_state_dict(setup.resumed["scaler"])
    if cfg.compile:  # the same in every arm: the common model, before any wrapper
        model = torch.compile(model)
    # fabric: Fabric(strategy=DDPStrategy(...)); lightning: Trainer(strategy=DDPStrategy(...))
    if setup.world.size > 1:
        model = DistributedDataParallel(
            model, device_ids=setup.ddp_device_ids, **distributed.DDP_KWARGS
        )
    return model, optimizer, scheduler, scaler


def fit(cfg, setup: RunSetup, model, optimizer, scheduler, scaler) -> None:
    device = setup.device
    # apex: amp patches torch (O1) or casts the model (O2); lightning: the precision plugin
    autocast = torch.autocast(
        device.type, dtype=setup.policy.dtype, enabled=setup.policy.autocast
    )
    steps = metrics.StepCounter(optimizer)
    net = models.unwrapped(model)  # without DDP's or compile's wrapper: what is saved

    def save(path):  # apex: amp.state_dict() for the scaler; lightning: trainer.save_checkpoint
        torch.save(
            {
                "model": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
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
                # apex: no autocast, amp patched torch; lightning: the precision plugin's
                with autocast, meter.saved_tensors(model):  # measures the run's first step
                    loss = models.cross_entropy(model(x), y)
                optimizer.zero_grad()
                # apex: with amp.scale_loss(loss, optimizer) as s: s.backward()
                scaler.scale(loss).backward()
                # lightning unscales before clipping too; apex: scale_loss unscaled already
                scaler.unscale_(optimizer)
                if cfg.clip_grad:  # apex: clips amp.master_params(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                scaler.step(optimizer)  # skipped when the gradients hold inf/nan
                scaler.update()  # apex: inside scale_loss
                scheduler.step()
                meter.step(loss, len(y))
                bar.advance()
            meter.train_done()
            model.eval()
            with torch.inference_mode(), autocast:  # apex: torch.no_grad() only
                for x, y in islice(setup.test_loader, setup.test_steps):
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    meter.eval_batch(model(x), y)
            # apex: amp.state_dict()["loss_scaler0"]["loss_scale"]
            row, losses = meter.finish(scaler.get_scale() if scaler.is_enabled() else None)
            setup.recorder.end_epoch(row, losses, net, save)  # also checks for divergence
            bar.update(info=progress.epoch_info(row))


def train(cfg) -> RunResult:
    setup = prepare(cfg, impl="plain")
    # Any exception ends here, as the run's status (failed, oom, ...); a usage error, exit 2.
    with setup.recorder:
        model, optimizer, scheduler, scaler = build(cfg, setup)
        fit(cfg, setup, model, optimizer, scheduler, scaler)
    return setup.recorder.result
