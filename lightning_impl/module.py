"""A thin LightningModule around the common model: the same loss and the same optimizer and
schedule (built by the same common function) as the plain loop. The Trainer runs the loop.

Where each line of the plain loop (plain_torch/train.py) happens here:

    sampler.set_epoch(epoch)         the fit loop, at each epoch start (it finds the sampler)
    model.train() / model.eval()     the fit loop, around training and validation
    with autocast: loss = ...        training_step, under the precision plugin's autocast
    optimizer.zero_grad()            the optimizer loop, before each training_step
    scaler.scale(loss).backward()    the precision plugin's backward (a GradScaler for 16-mixed)
    scaler.unscale_ + clip_grad_     Trainer(gradient_clip_val=...): the plugin unscales, clips
    scaler.step(opt); scaler.update  the plugin's optimizer_step
    scheduler.step()                 "interval": "step" below, after every optimizer step
    the evaluation pass              validation_step, with limit_val_batches = test steps
    meter.* (measurements)           the on_* hooks below: they only measure
    save(path): the checkpoint       trainer.save_checkpoint, with on_save_checkpoint below
    setup.resumed: load it back      Trainer.fit(ckpt_path=...) in train.py
"""

from __future__ import annotations

import pytorch_lightning as pl

from common import metrics, models


class LitClassifier(pl.LightningModule):
    def __init__(self, cfg, model, setup):
        super().__init__()
        # run_setup, not setup: LightningModule.setup is a hook
        self.cfg, self.model, self.run_setup = cfg, model, setup
        self.meter = self.steps = None

    def forward(self, x):
        return self.model(x)

    def configure_optimizers(self):
        optimizer, scheduler = models.build_optimizer(
            self.cfg, self.model, self.run_setup.steps_per_epoch
        )
        self.steps = metrics.StepCounter(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def training_step(self, batch, batch_idx):  # under the precision plugin's autocast
        x, y = batch
        with self.meter.saved_tensors(self.model):  # measures the run's first step
            return models.cross_entropy(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.meter.eval_batch(self.model(x), y)

    def on_train_epoch_start(self):
        self.meter = self.run_setup.meter(self.current_epoch, self.steps)

    def on_train_batch_start(self, batch, batch_idx):
        self.meter.batch_start()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.meter.step(outputs["loss"], len(batch[1]))

    def on_validation_epoch_start(self):
        self.meter.train_done()

    def on_train_epoch_end(self):  # runs after this epoch's validation
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        row, losses = self.meter.finish(scaler.get_scale() if scaler is not None else None)
        # Lightning's own checkpoint (model, optimizer, scheduler, scaler, loop state); the
        # recorder also checks for divergence. Saving is a collective: every rank calls it.
        self.run_setup.recorder.end_epoch(
            row, losses, self.model, self.trainer.save_checkpoint, save_is_collective=True
        )

    def on_save_checkpoint(self, checkpoint):  # the measurements so far, as every arm saves
        checkpoint.update(self.run_setup.recorder.state())
