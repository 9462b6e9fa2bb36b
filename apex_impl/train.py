"""NVIDIA apex: the same CIFAR-10 loop with amp.initialize + amp.scale_loss, as the many
codebases that still carry it wrote it. Needs CUDA and apex 25.04 or older (apex.amp was
removed after that release); see apex_impl/policy.py and the README's apex section.

Run:    ampcompare apex --dataset synthetic --model small --epochs 2 --opt-level O1
Read:   diff plain_torch/train.py apex_impl/train.py
Shows:  O0 is bitwise identical to plain 32-true; O1/O2 track plain 16-mixed within a stated
        tolerance (tests/test_apex.py, GPU + apex only).
Measured: nothing yet: it needs a GPU with apex 25.04; scripts/gpu_check.sh makes the
        figures there.
"""
from __future__ import annotations

from itertools import islice

import torch

from apex_impl.policy import check
from common import metrics, models, progress
from common.prepare import Run, prepare
from common.results import RunResult

try:
    from apex import amp
except ImportError:
    amp = None  # check() says what is missing before anything runs


def build(cfg, run: Run):
    model = models.build_model(cfg).to(run.device, memory_format=run.memory_format)
    optimizer, scheduler = models.build_optimizer(cfg, model, run.steps_per_epoch)
    model, optimizer = amp.initialize(model, optimizer, opt_level=cfg.opt_level, verbosity=0)  # plain: torch.amp.GradScaler(...); lightning: MixedPrecision plugin
    return model, optimizer, scheduler, None  # no scaler object: amp keeps its loss scalers inside


def fit(cfg, run: Run, model, optimizer, scheduler, scaler) -> None:
    device = run.device
    dynamic = cfg.opt_level in ("O1", "O2")  # O0 and O3 use a static loss scale of 1
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
                loss = models.cross_entropy(model(x), y)  # plain: under torch.autocast; apex patched torch (O1) or cast the model (O2, O3)
                optimizer.zero_grad()
                with amp.scale_loss(loss, optimizer) as scaled_loss:  # plain: scaler.scale(loss).backward()
                    scaled_loss.backward()  # gradients come out unscaled, overflow checked
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(amp.master_params(optimizer), cfg.clip_grad)
                optimizer.step()  # skipped by apex when the gradients hold inf/nan
                scheduler.step()
                meter.step(loss, len(y))
                bar.advance()
            meter.train_done()
            model.eval()
            with torch.no_grad():  # plain: inference_mode + autocast; apex's cast cache is built for no_grad
                for x, y in islice(run.test_loader, run.test_steps):
                    meter.eval_batch(model(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
            row, losses = meter.finish(amp.state_dict()["loss_scaler0"]["loss_scale"] if dynamic else None)
            run.recorder.add_epoch(row, losses)
            bar.info(row)
            metrics.check_diverged(losses)


def train(cfg) -> RunResult:
    opt_level, policy = check(cfg)
    cfg.opt_level = opt_level
    run = prepare(cfg, impl="apex", opt_level=opt_level, policy=policy)
    model, optimizer, scheduler, scaler = build(cfg, run)
    with run.recorder:
        fit(cfg, run, model, optimizer, scheduler, scaler)
    return run.recorder.close(model, optimizer=optimizer.state_dict(), amp=amp.state_dict())
