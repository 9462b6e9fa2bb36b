"""The one progress bar (rich): the hand-written loops show the steps of each epoch, compare
shows which arm of how many is running. Lightning's Trainer brings its own RichProgressBar.
Off the terminal, or with --quiet, every call is a no-op."""

from __future__ import annotations

import sys

from common import ranks


def enabled(cfg) -> bool:
    """On a terminal, unless --quiet; with several processes, rank 0's only."""
    return not cfg.quiet and sys.stderr.isatty() and ranks.is_rank0()


def epoch_info(row: dict) -> str:
    loss = row["train_loss"] if row["train_loss"] is not None else float("nan")
    acc = f"  test acc {row['test_acc']:.3f}" if row["test_acc"] is not None else ""
    return f"loss {loss:.4f}{acc}"


class Bar:
    """One line per task (an epoch, or the whole comparison), with count, elapsed time, time
    left and a free-text field."""

    def __init__(self, on: bool):
        self.on, self.progress, self.current = on, None, None
        if on:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )

    def __enter__(self) -> "Bar":
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            return self.progress.__exit__(*exc)
        return False

    def task(self, description: str, total: int) -> None:
        if self.progress is not None:
            self.current = self.progress.add_task(description, total=total, info="")

    def advance(self) -> None:
        if self.current is not None:
            self.progress.advance(self.current)

    def update(self, **fields) -> None:
        """completed=, description= or info= of the current task."""
        if self.current is not None:
            self.progress.update(self.current, **fields)
