"""PyTorch Lightning: the same CIFAR-10 training with Trainer(precision="32-true" |
"16-mixed" | "bf16-mixed" | "bf16-true" | "16-true") running the loop, around a thin
LightningModule (module.py).

Run:    ampcompare lightning --dataset synthetic --model small --epochs 2
Read:   sdiff -W -w 200 plain_torch/train.py lightning_impl/module.py   for the loop, and
        sdiff -w 200 plain_torch/train.py lightning_impl/train.py   for build, where the
        Trainer's arguments stand for plain's DDP wrapper and GradScaler
Shows:  per-step losses and final weights bitwise identical to the plain loop at 32-true,
        bf16-mixed, 16-mixed, bf16-true and 16-true (tests/test_parity.py, test_ladder.py),
        and what the Trainer costs per step (ampcompare bench).
Measured: figures with their commands and machines are in docs/benchmark.md (every arm)
        and docs/bench.md (what a framework adds to a step), not here, where they would rot.
"""

from __future__ import annotations

import torch
import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.plugins import MixedPrecision
from pytorch_lightning.strategies import DDPStrategy, ModelParallelStrategy

from common import lightning_args, model_spec, precision as precisions, progress
from lightning_impl.callback import Measured
from lightning_impl.module import LitClassifier
from record.prepare import RunSetup, prepare
from record.results import RunResult


def build(cfg, setup: RunSetup):
    # plain: .to(device) here; the Trainer moves the model itself
    model = model_spec.build_model(cfg).to(memory_format=setup.memory_format)
    if cfg.compile:  # the same in every arm: the common model, before any wrapper
        model = torch.compile(model)
    # plain: models.build_optimizer(...) inline; here in configure_optimizers
    module = LitClassifier(cfg, model, setup)
    # ours, the same for Fabric: the CPU's fp16 plugin, DDP's pinned settings (plain passes
    # them to DistributedDataParallel), FSDP2 through module.py's configure_model
    precision, plugins = lightning_args.precision(
        setup.policy, setup.device.type, MixedPrecision
    )
    strategy = lightning_args.strategy(
        setup.world, setup.sharded, DDPStrategy, ModelParallelStrategy
    )
    bar = progress.enabled(cfg)
    trainer = pl.Trainer(
        accelerator=setup.device.type,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=strategy,
        precision=precision,
        plugins=plugins,
        max_epochs=cfg.epochs,
        limit_train_batches=setup.steps_per_epoch,
        limit_val_batches=setup.test_steps,
        num_sanity_val_steps=0,  # the plain loop evaluates nothing before training
        gradient_clip_val=cfg.clip_grad or None,  # plain: scaler.unscale_ + clip_grad_norm_
        benchmark=setup.switches["cudnn_benchmark"],
        deterministic=cfg.deterministic,
        use_distributed_sampler=False,  # the common sampler already orders by (seed, epoch)
        enable_progress_bar=bar,
        callbacks=[Measured(setup), *([RichProgressBar()] if bar else [])],
        logger=False,  # result.json is the record, as for every arm
        enable_checkpointing=False,  # module.py saves checkpoint.pt each epoch, as every arm
        enable_model_summary=False,
    )  # a table at start-up that the other arms do not print
    chosen = trainer.precision_plugin.precision
    precisions.refuse_unless_ran("Lightning", chosen, setup.policy, setup.device.type)
    return module, trainer


def fit(setup: RunSetup, module, trainer) -> None:
    # plain: loads setup.resumed into each object in build()
    ckpt_path = setup.recorder.checkpoint_path if setup.resumed else None
    try:
        # plain: the epoch loop, written out
        trainer.fit(
            module,
            train_dataloaders=setup.train_loader,
            val_dataloaders=setup.test_loader,
            ckpt_path=ckpt_path,
            weights_only=True,
        )
    except SystemExit:
        if trainer.interrupted:  # Lightning answers Ctrl-C with sys.exit(1)
            raise KeyboardInterrupt from None
        raise


def train(cfg) -> RunResult:
    setup = prepare(cfg, impl="lightning")
    # Any exception ends here, as the run's status (failed, oom, ...); a usage error, exit 2.
    with setup.recorder:
        module, trainer = build(cfg, setup)
        fit(setup, module, trainer)
    return setup.recorder.result
