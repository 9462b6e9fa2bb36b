"""NVIDIA apex: the same CIFAR-10 loop with amp.initialize + amp.scale_loss, as the many
codebases that still carry it wrote it. Needs CUDA and apex 25.04 or older (apex.amp was
removed after that release); see apex_impl/opt_levels.py and docs/apex.md.

Run:    ampcompare apex --dataset synthetic --model small --epochs 2 --opt-level O1
Read:   sdiff -w 200 plain_torch/train.py apex_impl/train.py
Shows:  O0 is bitwise identical to plain 32-true; O1/O2 track plain 16-mixed within a stated
        tolerance (tests/test_apex.py, GPU + apex only).
Measured: nothing yet: it needs a GPU with apex 25.04; scripts/gpu_check.sh makes the
        figures there.
"""

from __future__ import annotations

from itertools import islice

import torch
from torch.nn.parallel import DistributedDataParallel

from apex_impl.opt_levels import check, torch_restored
from common import distributed, metrics, model_spec, models, progress
from record.prepare import RunSetup, prepare
from record.results import RunResult

try:
    from apex import amp
except ImportError:
    amp = None  # check() says what is missing before anything runs


def build(cfg, setup: RunSetup):
    model = model_spec.build_model(cfg).to(setup.device, memory_format=setup.memory_format)
    optimizer, scheduler = models.build_optimizer(cfg, model, setup.steps_per_epoch)
    # plain: torch.amp.GradScaler(...); lightning: the MixedPrecision plugin's scaler.
    # amp keeps its loss scalers inside, so there is no scaler object to return.
    model, optimizer = amp.initialize(model, optimizer, opt_level=cfg.opt_level, verbosity=0)
    if setup.resumed:  # plain: scaler.load_state_dict; lightning: Trainer.fit(ckpt_path=...)
        model.load_state_dict(setup.resumed["model"])
        optimizer.load_state_dict(setup.resumed["optimizer"])
        scheduler.load_state_dict(setup.resumed["scheduler"])
        amp.load_state_dict(setup.resumed["amp"])  # apex: after amp.initialize
    if cfg.compile:  # the same in every arm: the common model, before any wrapper
        model = torch.compile(model)
    if setup.world.size > 1:  # around the model amp.initialize returned, as apex documents
        model = DistributedDataParallel(
            model, device_ids=setup.ddp_device_ids, **distributed.DDP_KWARGS
        )
    return model, optimizer, scheduler


def fit(cfg, setup: RunSetup, model, optimizer, scheduler) -> None:
    device = setup.device
    dynamic = cfg.opt_level in ("O1", "O2")  # O0 and O3 use a static loss scale of 1
    steps = metrics.StepCounter(optimizer)
    net = models.unwrapped(model)  # without DDP's or compile's wrapper: what is saved

    def save(path):  # plain: scaler.state_dict(); lightning: trainer.save_checkpoint
        torch.save(
            {
                "model": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "amp": amp.state_dict(),
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
                # plain: under torch.autocast; here amp patched torch (O1) or cast the model
                with meter.saved_tensors(model):  # measures the run's first step
                    loss = models.cross_entropy(model(x), y)
                optimizer.zero_grad()
                # plain: scaler.scale(loss).backward(); the gradients come out unscaled
                with amp.scale_loss(loss, optimizer) as scaled_loss:
                    scaled_loss.backward()
                if cfg.clip_grad:  # plain: scaler.unscale_, then clip model.parameters()
                    torch.nn.utils.clip_grad_norm_(amp.master_params(optimizer), cfg.clip_grad)
                optimizer.step()  # plain: scaler.step; apex skips it on inf/nan gradients
                scheduler.step()
                meter.step(loss, len(y))
                bar.advance()
            meter.train_done()
            model.eval()
            with torch.no_grad():  # plain: inference_mode + autocast; amp's casts need no_grad
                for x, y in islice(setup.test_loader, setup.test_steps):
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    meter.eval_batch(model(x), y)
            # plain: scaler.get_scale(); lightning: trainer.precision_plugin.scaler
            scale = amp.state_dict()["loss_scaler0"]["loss_scale"] if dynamic else None
            row, losses = meter.finish(scale)
            setup.recorder.end_epoch(row, losses, net, save)  # also checks for divergence
            bar.update(info=progress.epoch_info(row))


def train(cfg) -> RunResult:
    opt_level, policy = check(cfg)
    cfg.opt_level = opt_level
    setup = prepare(cfg, impl="apex", opt_level=opt_level, policy=policy)
    # Any exception ends here, as the run's status (failed, oom, ...); a usage error, exit 2.
    with torch_restored(), setup.recorder:  # ours: apex leaves O1's patches in place
        model, optimizer, scheduler = build(cfg, setup)
        fit(cfg, setup, model, optimizer, scheduler)
    return setup.recorder.result
