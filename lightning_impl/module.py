"""A thin LightningModule around the common model: the same loss and the same optimizer and
schedule (built by the same common function) as the plain loop. The Trainer runs the loop.

Read it against the plain loop: sdiff -W -w 200 plain_torch/train.py lightning_impl/module.py
(-W: the loop's lines sit deeper in plain). Where each line of that loop happens here:

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

    # The hooks follow plain's build and fit in order, each opposite the plain lines it stands
    # for in `sdiff -W -w 200 plain_torch/train.py lightning_impl/module.py`, with the same
    # local names (hence the `meter = self.meter` lines).

    def configure_optimizers(self):  # plain: in build; the scaler is the precision plugin's
        cfg, model, setup = self.cfg, self.model, self.run_setup
        optimizer, scheduler = models.build_optimizer(cfg, model, setup.steps_per_epoch)
        self.steps = metrics.StepCounter(optimizer)
        schedule = {"scheduler": scheduler, "interval": "step"}  # plain: scheduler.step()
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def on_save_checkpoint(self, checkpoint):  # plain: save(path), the measurements so far
        setup = self.run_setup
        checkpoint.update(setup.recorder.state())

    def on_train_epoch_start(self):  # the Trainer called set_epoch and model.train() already
        setup, epoch, steps = self.run_setup, self.current_epoch, self.steps
        meter = setup.meter(epoch, steps)
        self.meter = meter

    def on_train_batch_start(self, batch, batch_idx):  # the batch is on the device already
        meter = self.meter
        meter.batch_start()

    def training_step(self, batch, batch_idx):  # under the precision plugin's autocast
        meter, model, (x, y) = self.meter, self.model, batch
        with meter.saved_tensors(model):  # measures the run's first step
            loss = models.cross_entropy(model(x), y)
        # plain: zero_grad, backward, unscale_, clip, step, update: the Trainer's, after this
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):  # after scheduler.step()
        meter, loss, (_, y) = self.meter, outputs["loss"], batch
        meter.step(loss, len(y))

    def on_validation_epoch_start(self):  # then model.eval() and inference_mode
        meter = self.meter
        meter.train_done()

    def validation_step(self, batch, batch_idx):  # under the precision plugin's autocast
        meter, model, (x, y) = self.meter, self.model, batch
        meter.eval_batch(model(x), y)

    def on_train_epoch_end(self):  # runs after this epoch's validation
        meter, setup, net = self.meter, self.run_setup, self.model
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        row, losses = meter.finish(scaler.get_scale() if scaler is not None else None)
        # plain: torch.save; here Lightning's own checkpoint (model, optimizer, scheduler,
        # scaler, loop state). Saving is a collective: every rank calls it.
        save = self.trainer.save_checkpoint
        setup.recorder.end_epoch(row, losses, net, save, save_is_collective=True)
