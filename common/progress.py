"""The rich progress bar for the hand-written loops (Lightning brings its own RichProgressBar)."""
from __future__ import annotations

import sys
from contextlib import nullcontext


def enabled(cfg) -> bool:
    return not cfg.quiet and sys.stderr.isatty()


class Bar:
    """One task per epoch; calls are no-ops when the bar is off."""

    def __init__(self, cfg, steps_per_epoch: int):
        self.steps, self.task = steps_per_epoch, None
        self.progress = None
        if enabled(cfg):
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                     transient=False)

    def __enter__(self):
        (self.progress or nullcontext()).__enter__()
        return self

    def __exit__(self, *exc):
        return (self.progress or nullcontext()).__exit__(*exc)

    def epoch(self, epoch: int) -> None:
        if self.progress is not None:
            self.task = self.progress.add_task(f"epoch {epoch}", total=self.steps, info="")

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)

    def info(self, row: dict) -> None:
        if self.progress is not None and row["test_acc"] is not None:
            self.progress.update(self.task, info=f"loss {row['train_loss'] or float('nan'):.4f}  "
                                 f"test acc {row['test_acc']:.3f}")
