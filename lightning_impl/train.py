"""PyTorch Lightning: the same CIFAR-10 training with Trainer(precision="16-mixed" | "bf16-mixed"
| "32-true") running the loop, around a thin LightningModule (module.py).

Run:    ampcompare lightning --dataset synthetic --model small --epochs 2
Read:   diff plain_torch/train.py lightning_impl/train.py
Shows:  per-step losses and final weights bitwise identical to the plain loop at 32-true,
        bf16-mixed and 16-mixed (tests/test_parity.py), and what the Trainer costs per epoch
        (benchmarks/lightning_overhead.py).
Measured: same setup as plain_torch/train.py, pytorch-lightning 2.6.6: 3.35 s/epoch at
        bf16-mixed (plain: 3.27); alternating with plain in one process, lightning/plain =
        1.011 at 32-true and 0.998 at bf16-mixed (README, "What Lightning costs").
"""
from __future__ import annotations

import torch
import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.plugins import MixedPrecision

from common import models, progress
from common.errors import UsageError
from common.prepare import Run, prepare
from common.results import RunResult
from lightning_impl.module import LitClassifier


def build(cfg, run: Run):
    model = models.build_model(cfg).to(memory_format=run.memory_format)  # the Trainer moves it to the device
    module = LitClassifier(cfg, model, run)  # plain: models.build_optimizer(...) inline; here configure_optimizers
    precision, plugins = run.policy.effective, []
    if precision == "16-mixed" and run.device.type == "cpu":
        # Lightning turns "16-mixed" into bf16 on CPU unless it gets the plugin with a scaler.
        precision, plugins = None, [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]
    trainer = pl.Trainer(
        accelerator=run.device.type, devices=1, precision=precision, plugins=plugins,
        max_epochs=cfg.epochs, limit_train_batches=run.steps_per_epoch,
        limit_val_batches=run.test_steps, num_sanity_val_steps=0,
        gradient_clip_val=cfg.clip_grad or None,  # plain: scaler.unscale_ + clip_grad_norm_
        benchmark=run.switches["cudnn_benchmark"], deterministic=cfg.deterministic,
        use_distributed_sampler=False,  # the common sampler already orders by (seed, epoch)
        enable_progress_bar=progress.enabled(cfg), callbacks=[RichProgressBar()] if progress.enabled(cfg) else [],
        logger=False, enable_checkpointing=False, enable_model_summary=False)
    if trainer.precision_plugin.precision != run.policy.effective:
        raise UsageError(f"Lightning chose {trainer.precision_plugin.precision} for "
                         f"{run.policy.effective} on {run.device.type}; refusing to record the wrong one")
    return model, module, trainer


def fit(cfg, run: Run, model, module, trainer) -> None:
    try:
        trainer.fit(module, train_dataloaders=run.train_loader, val_dataloaders=run.test_loader)  # plain: the epoch loop
    except SystemExit:
        if trainer.interrupted:  # Lightning answers Ctrl-C with sys.exit(1)
            raise KeyboardInterrupt from None
        raise


def train(cfg) -> RunResult:
    run = prepare(cfg, impl="lightning")
    model, module, trainer = build(cfg, run)
    with run.recorder:
        fit(cfg, run, model, module, trainer)
    optimizer = trainer.optimizers[0].state_dict() if trainer.optimizers else None  # none if fit failed early
    return run.recorder.close(model, optimizer=optimizer, scaler=trainer.precision_plugin.state_dict())
