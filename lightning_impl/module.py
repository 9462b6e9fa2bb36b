"""A thin LightningModule around the common model: the same loss and the same optimizer and
schedule (built by the same common function) as the plain loop. The Trainer runs the loop;
callback.py measures and records it, as record/epochs.py does for the hand-written loops.

Read it against the plain loop: sdiff -W -w 200 plain_torch/train.py lightning_impl/module.py
(-W: the loop's lines sit deeper in plain). Where plain's lines live in Lightning:
    sharding.shard (--strategy fsdp) configure_model, under Trainer's ModelParallelStrategy
    sampler.set_epoch(epoch)         the fit loop, at each epoch start (it finds the sampler)
    model.train() / model.eval()     the fit loop, around training and validation
    with autocast: loss = ...        training_step, under the precision plugin's autocast
    optimizer.zero_grad()            the optimizer loop, around each training_step
    scaler.scale(loss).backward()    the precision plugin's backward (a GradScaler for 16-mixed)
    scaler.unscale_ + clip_grad_     Trainer(gradient_clip_val=...): the plugin unscales, clips
    scaler.step(opt); scaler.update  the plugin's optimizer_step
    scheduler.step()                 "interval": "step" below, after every optimizer step
    the evaluation pass              validation_step, with limit_val_batches = test steps
    epoch.* (measurements, record)   callback.py's hooks at the same points of the loop
    save(path): the checkpoint       trainer.save_checkpoint, from callback.py
    setup.resumed: load it back      Trainer.fit(ckpt_path=...) in train.py
"""

from __future__ import annotations

import pytorch_lightning as pl

from common import models, sharding


class LitClassifier(pl.LightningModule):
    def __init__(self, cfg, model, setup):
        super().__init__()
        # run_setup, not setup: LightningModule.setup is a hook
        self.cfg, self.model, self.run_setup = cfg, model, setup

    def configure_model(self):  # --strategy fsdp: plain shards the model as it builds it
        setup = self.run_setup
        if setup.sharded:
            mesh = self.device_mesh["data_parallel"]
            sharding.shard(self.model, mesh, setup.policy.param_dtype)

    def forward(self, x):
        return self.model(x)

    def configure_optimizers(self):
        cfg, model, setup = self.cfg, self.model, self.run_setup
        optimizer, scheduler = models.build_optimizer(cfg, model, setup.steps_per_epoch)
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = models.cross_entropy(self.model(x), y)
        return loss

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        return self.model(x)  # the logits: callback.py weighs them against the labels
