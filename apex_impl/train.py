"""NVIDIA apex: the same CIFAR-10 loop with amp.initialize + amp.scale_loss, as the many
codebases that still carry it wrote it. Needs CUDA and apex 25.04 or older (apex.amp was
removed after that release); see apex_impl/opt_levels.py and docs/apex.md.

Run:    ampcompare apex --dataset synthetic --model small --epochs 2 --opt-level O1
Read:   sdiff -w 200 plain_torch/train.py apex_impl/train.py
Shows:  O0 is bitwise identical to plain 32-true; O1/O2 track plain 16-mixed within a stated
        tolerance (tests/test_apex.py, GPU + apex only).
Where plain's lines live here:
    GradScaler(...)                 amp.initialize: amp keeps its loss scalers inside
    with autocast:                  none: O1 patched torch's functions, O2 cast the model
    scale(loss).backward()          with amp.scale_loss(loss, optimizer) as s: s.backward()
    unscale_ + clip_grad_norm_      scale_loss unscaled already; clip amp.master_params
    scaler.step; scaler.update      optimizer.step(), skipped by amp on inf/nan; the scale
                                    is updated inside scale_loss
    scaler.get_scale(); its state   amp.state_dict(), saved and loaded after initialize
    inference_mode() + autocast     no_grad(): amp's casts need it
Measured: nothing yet: it needs a GPU with apex 25.04; scripts/gpu_check.sh makes the
        figures there.
"""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from apex_impl.opt_levels import check, torch_restored
from common import distributed, model_spec, models
from record.prepare import RunSetup, prepare
from record.results import RunResult

try:
    from apex import amp
except ImportError:
    amp = None  # check() says what is missing before anything runs


def build(cfg, setup: RunSetup):
    model = model_spec.build_model(cfg).to(setup.device, memory_format=setup.memory_format)
    optimizer, scheduler = models.build_optimizer(cfg, model, setup.steps_per_epoch)
    model, optimizer = amp.initialize(model, optimizer, opt_level=cfg.opt_level, verbosity=0)
    if setup.resumed:
        model.load_state_dict(setup.resumed["model"])
        optimizer.load_state_dict(setup.resumed["optimizer"])
        scheduler.load_state_dict(setup.resumed["scheduler"])
        amp.load_state_dict(setup.resumed["amp"])
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
    net = models.unwrapped(model)  # without DDP's or compile's wrapper: what is saved

    def save(path):
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

    for epoch in setup.epochs(cfg, optimizer):  # measured, recorded, shown (record/epochs.py)
        setup.train_loader.batch_sampler.sampler.set_epoch(epoch.number)
        model.train()
        for x, y in epoch.batches(setup.train_loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with epoch.measured(model):
                loss = models.cross_entropy(model(x), y)
            optimizer.zero_grad()
            with amp.scale_loss(loss, optimizer) as scaled_loss:
                scaled_loss.backward()
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(amp.master_params(optimizer), cfg.clip_grad)
            optimizer.step()  # skipped when the gradients hold inf/nan
            scheduler.step()
            epoch.step_done(loss, len(y))
        model.eval()
        with torch.no_grad():
            for x, y in epoch.test_batches(setup.test_loader):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                epoch.evaluated(model(x), y)
        scale = amp.state_dict()["loss_scaler0"]["loss_scale"] if dynamic else None
        epoch.end(scale, net, save)


def train(cfg) -> RunResult:
    opt_level, policy = check(cfg)
    cfg.opt_level = opt_level
    setup = prepare(cfg, impl="apex", opt_level=opt_level, policy=policy)
    # Any exception ends here, as the run's status (failed, oom, ...); a usage error, exit 2.
    with torch_restored(), setup.recorder:  # ours: apex leaves O1's patches in place
        model, optimizer, scheduler = build(cfg, setup)
        fit(cfg, setup, model, optimizer, scheduler)
    return setup.recorder.result
