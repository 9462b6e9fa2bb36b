"""An epoch as every hand-written loop sees it: the measurements (common/metrics.py), the
record (recorder.py) and the progress bar behind the same few calls, so that each train.py
shows its framework's loop and little else.

    for epoch in setup.epochs(cfg, optimizer):
        for x, y in epoch.batches(loader):        # each step's timing starts as it is handed
            with epoch.measured(model):            # the run's first forward: saved tensors
                loss = ...
            ...                                    # backward, step: the framework's
            epoch.step_done(loss, len(y))          # the step's end: its time and loss
        for x, y in epoch.test_batches(loader):   # training time has ended
            epoch.evaluated(model(x), y)
        epoch.end(scaler, net, save)               # the row, the checkpoint, the bar

The timing contract is EpochMeter's: a step's time runs from the end of one step to the end of
the next (the epoch's first, from when its batch was handed out), and the wait for the batch
sits beside it. Lightning, whose Trainer runs the loop, makes the same calls from a Callback.
"""

from __future__ import annotations

from itertools import islice
from typing import Callable, Iterator

import torch

from common import metrics, model_state, progress


class Epoch:
    def __init__(self, setup, number: int, steps: metrics.StepCounter, bar):
        """setup: the run's RunSetup (record/prepare.py, which imports this module)."""
        self.setup, self.number, self.bar = setup, number, bar
        self.meter = metrics.EpochMeter(setup.device, number, steps, setup.flops)
        self.model, self.state = None, None  # the model trained, what it keeps between steps
        bar.task(f"epoch {number}", setup.steps_per_epoch)

    def batches(self, loader) -> Iterator:
        """The epoch's training batches; when they run out, its training time ends."""
        for batch in islice(loader, self.setup.steps_per_epoch):
            self.batch_started()
            yield batch
        self.training_done()

    def batch_started(self) -> None:
        """The step's batch is at hand: the wait for it ends (Lightning calls it itself)."""
        self.meter.batch_start()

    def training_done(self) -> None:
        self.meter.train_done()

    def measured(self, model: torch.nn.Module):
        """Around a step's forward: on the run's first, what it saves for backward."""
        self.model = model
        return self.meter.saved_tensors(model)

    def step_done(self, loss: torch.Tensor, images: int) -> None:
        """The step has ended: its time and loss. After the epoch's last, the model state the
        run keeps between steps is counted, its gradients and optimizer state in place (before
        a framework frees the gradients for its evaluation, as Lightning does); no step's time
        includes the count."""
        self.meter.step(loss, images)
        if self.model is not None and len(self.meter.losses) == self.setup.steps_per_epoch:
            self.state = model_state.bytes_of(self.model, self.meter.steps.optimizer)
        self.bar.advance()

    def test_batches(self, loader) -> Iterator:
        return islice(loader, self.setup.test_steps)

    def evaluated(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.meter.eval_batch(logits, labels)

    def end(
        self,
        scaler,
        net: torch.nn.Module,
        save: Callable[[str], None],
        save_is_collective: bool = False,
    ) -> None:
        """The epoch's row into the record, with the model state the run keeps (net: the
        model without any wrapper), the checkpoint saved (the recorder also checks for
        divergence), and the bar told. scaler: the run's torch.amp.GradScaler, enabled or
        not, or None, or a loss scale as a number (a framework's own scaler: apex's)."""
        scale = scaler
        if isinstance(scaler, torch.amp.GradScaler):
            scale = scaler.get_scale() if scaler.is_enabled() else None
        row, losses = self.meter.finish(scale)
        if self.state is not None:
            row["model_state"] = {**self.state, "scaler": model_state.scaler_bytes(scaler)}
        self.setup.recorder.end_epoch(row, losses, net, save, save_is_collective)
        self.bar.update(info=progress.epoch_info(row))


def epochs(setup, cfg, optimizer) -> Iterator[Epoch]:
    """The run's epochs from the first it has not done, under one progress bar."""
    steps = metrics.StepCounter(optimizer)  # counts the optimizer steps that really ran
    with progress.Bar(progress.enabled(cfg)) as bar:
        for number in range(setup.recorder.start_epoch, cfg.epochs):
            yield Epoch(setup, number, steps, bar)
