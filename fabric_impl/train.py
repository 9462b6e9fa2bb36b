"""Lightning Fabric: the hand-written loop, with precision, device placement and the loss
scaler handled by Fabric(precision=...) and fabric.setup(...), fabric.backward(...).

Run:    ampcompare fabric --dataset synthetic --model small --epochs 2
Read:   sdiff -w 200 plain_torch/train.py fabric_impl/train.py
Shows:  per-step losses and final weights bitwise identical to the plain loop at 32-true,
        bf16-mixed and 16-mixed (tests/test_fabric.py), and what Fabric costs per step
        (ampcompare bench).
Measured: figures with their commands and machines are in docs/benchmark.md (every arm)
        and docs/bench.md (what a framework adds to a step), not here, where they would rot.
"""

from __future__ import annotations

from itertools import islice

import torch
from lightning_fabric import Fabric
from lightning_fabric.plugins import MixedPrecision
from lightning_fabric.strategies import DDPStrategy

from common import distributed, metrics, model_spec, models, progress
from common.errors import Unavailable
from record.prepare import RunSetup, prepare
from record.results import RunResult


def build(cfg, setup: RunSetup):
    precision, plugins = setup.policy.effective, []
    if precision == "16-mixed" and setup.device.type == "cpu":
        # Fabric turns "16-mixed" into bf16 on CPU unless it gets the plugin with a scaler.
        scaler = torch.amp.GradScaler("cpu")
        precision, plugins = None, [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    # plain: DistributedDataParallel(model, ...) itself; the same DDP settings
    strategy = (
        DDPStrategy(
            process_group_backend=setup.world.backend,
            timeout=distributed.TIMEOUT,
            **distributed.DDP_KWARGS,
        )
        if setup.world.size > 1
        else "auto"
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
    if fabric.strategy.precision.precision != setup.policy.effective:
        raise Unavailable(
            f"Fabric chose {fabric.strategy.precision.precision} for "
            f"{setup.policy.effective} on {setup.device.type}; refusing to record "
            f"the wrong one"
        )
    # plain: .to(device) here; fabric.setup moves the model itself
    model = model_spec.build_model(cfg).to(memory_format=setup.memory_format)
    optimizer, scheduler = models.build_optimizer(cfg, model, setup.steps_per_epoch)
    if cfg.compile:  # the same in every arm: the common model, before any wrapper
        model = torch.compile(model)
    # plain: torch.amp.GradScaler(...); here the precision plugin holds it (None unless fp16)
    model, optimizer = fabric.setup(model, optimizer)
    if setup.resumed:  # plain: load_state_dict on each; lightning: Trainer.fit(ckpt_path=...)
        state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
        scaler = fabric.strategy.precision.scaler if setup.policy.scaler else None
        fabric.load(
            setup.recorder.checkpoint_path,
            {**state, **({"scaler": scaler} if scaler else {})},
            strict=False,
            weights_only=True,
        )
    return fabric, model, optimizer, scheduler


def fit(cfg, setup: RunSetup, fabric, model, optimizer, scheduler) -> None:
    # plain: torch.autocast; here every forward of the model Fabric set up runs in its autocast
    train_loader, test_loader = fabric.setup_dataloaders(
        setup.train_loader, setup.test_loader, use_distributed_sampler=False
    )
    steps = metrics.StepCounter(optimizer.optimizer)
    scaler = fabric.strategy.precision.scaler if setup.policy.scaler else None

    def save(path):  # plain: torch.save; fabric.save leaves out the scaler: saved here
        fabric.save(
            path,
            {
                "model": model,
                "optimizer": optimizer,
                "scheduler": scheduler,
                **({"scaler": scaler} if scaler else {}),
                **setup.recorder.state(),
            },
        )

    with progress.Bar(progress.enabled(cfg)) as bar:
        for epoch in range(setup.recorder.start_epoch, cfg.epochs):
            # plain: sampler.set_epoch(epoch). Fabric's loader calls it at iter() with its count
            # of iter() calls, made the epoch here (a resumed run starts at a later one).
            train_loader._num_iter_calls = epoch
            meter = setup.meter(epoch, steps)
            bar.task(f"epoch {epoch}", setup.steps_per_epoch)
            model.train()
            for x, y in islice(train_loader, setup.steps_per_epoch):
                meter.batch_start()
                # plain: x.to(device), y.to(device); the Fabric loader moved them
                with meter.saved_tensors(model):  # measures the run's first step
                    loss = models.cross_entropy(model(x), y)
                optimizer.zero_grad()
                fabric.backward(loss)  # plain: scaler.scale(loss).backward()
                if cfg.clip_grad:  # plain: scaler.unscale_ + clip_grad_norm_; Fabric unscales
                    fabric.clip_gradients(
                        model, optimizer, max_norm=cfg.clip_grad, error_if_nonfinite=False
                    )
                optimizer.step()  # plain: scaler.step + scaler.update; skipped on inf/nan
                scheduler.step()
                meter.step(loss, len(y))
                bar.advance()
            meter.train_done()
            model.eval()
            with torch.inference_mode():  # plain: inference_mode + autocast
                for x, y in islice(test_loader, setup.test_steps):
                    meter.eval_batch(model(x), y)
            row, losses = meter.finish(scaler.get_scale() if scaler else None)
            # fabric.save is a collective (rank 0 writes): every rank calls it
            setup.recorder.end_epoch(row, losses, model, save, save_is_collective=True)
            bar.update(info=progress.epoch_info(row))


def train(cfg) -> RunResult:
    setup = prepare(cfg, impl="fabric")
    # Any exception ends here, as the run's status (failed, oom, ...); a usage error, exit 2.
    with setup.recorder:
        fabric, model, optimizer, scheduler = build(cfg, setup)
        fit(cfg, setup, fabric, model, optimizer, scheduler)
    return setup.recorder.result
