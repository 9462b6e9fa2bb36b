"""What the hand-written loops do through record/epochs.py, done where Lightning keeps such
things: a Callback, at the same points of the Trainer's loop. It only measures and records;
the training is module.py's and the Trainer's."""

from __future__ import annotations

import pytorch_lightning as pl

from common import metrics, progress
from record.epochs import Epoch


class Measured(pl.Callback):
    def __init__(self, setup):
        self.setup, self.epoch, self.steps, self.saving = setup, None, None, None
        self.bar = progress.Bar(False)  # the Trainer brings its own progress bar

    def on_fit_start(self, trainer, module):
        self.steps = metrics.StepCounter(trainer.optimizers[0])

    def on_train_epoch_start(self, trainer, module):  # after set_epoch and model.train()
        self.epoch = Epoch(self.setup, trainer.current_epoch, self.steps, self.bar)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.epoch.batch_started()  # the batch is on the device already
        self.saving = self.epoch.measured(module.model)  # around training_step's forward
        self.saving.__enter__()

    def on_before_zero_grad(self, trainer, module, optimizer):  # after training_step
        self.saving.__exit__(None, None, None)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.epoch.step_done(outputs["loss"], len(batch[1]))  # after scheduler.step()

    def on_validation_epoch_start(self, trainer, module):  # then model.eval(), inference_mode
        self.epoch.training_done()

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.epoch.evaluated(outputs, batch[1])

    def on_train_epoch_end(self, trainer, module):  # runs after this epoch's validation
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        # Lightning's own checkpoint (model, optimizer, scheduler, scaler, loop state);
        # saving is a collective: every rank calls it
        self.epoch.end(scaler, module.model, trainer.save_checkpoint, save_is_collective=True)

    def on_save_checkpoint(self, trainer, module, checkpoint):  # the measurements so far
        checkpoint.update(self.setup.recorder.state())
