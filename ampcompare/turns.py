"""Arms that take turns in one process: each runs in a thread of its own, one epoch at a time,
epoch k of every arm before epoch k + 1 of any, in an order that rotates each round, so that a
burst of machine noise falls on all of them (ampcompare/bench_process.py uses it)."""

from __future__ import annotations

import threading
import types

import torch

from common import metrics
from record import signals


class Turns:
    """One arm runs an epoch at a time, in turn: epoch k of every arm before epoch k + 1 of any,
    in an order that rotates each round. An arm holds its turn from the start of its epoch
    (EpochMeter) to the start of its next one, or the end of its run."""

    def __init__(self, names):
        self.names, self.round, self.finished = list(names), 0, set()
        self.cond, self.holder, self.queue = threading.Condition(), None, []
        self._new_round()

    def _new_round(self):
        k = self.round % len(self.names)
        self.queue = [n for n in self.names[k:] + self.names[:k] if n not in self.finished]
        self.round += 1

    def _release(self):
        self.holder = None
        if not self.queue:
            self._new_round()
        self.cond.notify_all()

    def take(self, name):
        with self.cond:
            if self.holder == name:
                self._release()
            while not (self.holder is None and self.queue and self.queue[0] == name):
                if STOP.is_set():
                    raise KeyboardInterrupt
                self.cond.wait()
            self.queue.pop(0)
            self.holder = name

    def done(self, name):
        with self.cond:
            self.finished.add(name)
            self.queue = [n for n in self.queue if n != name]
            if self.holder == name:
                self._release()
            self.cond.notify_all()


STOP = threading.Event()  # set by a signal: every arm stops at its next step


def take_turns(jobs: dict, threads: int) -> dict:
    """Run every job (a function of no arguments that trains a run) in a thread of its own,
    epoch by epoch in turn, each with an OpenMP team of `threads`; their results, by name.
    (Lightning registers signal handlers only from the main thread.) After a signal each arm
    stops at its next step, as a run stops on Ctrl-C: its record says interrupted."""
    turns, out = Turns(jobs), {}

    def stop_here():
        if STOP.is_set() and threading.current_thread().name in jobs:
            raise KeyboardInterrupt

    def hook(epoch):
        name = threading.current_thread().name
        if name in jobs:
            stop_here()
            turns.take(name)
            stop_here()

    def run(name, job):
        torch.set_num_threads(threads)
        try:
            stop_here()
            out[name] = job()
        except Exception as e:  # a refused option, say: its measures say so, the rest go on
            out[name] = types.SimpleNamespace(
                status="failed", error=f"{type(e).__name__}: {e}", epochs=[], summary={}
            )
        except KeyboardInterrupt:  # stopped before its run had begun
            out[name] = types.SimpleNamespace(
                status="interrupted", error="interrupted", epochs=[], summary={}
            )
        finally:
            turns.done(name)

    # While the arms run, a signal is held back from this thread: raised here at any point of
    # the wait, it would leave the wait with arms still running and no hooks to stop them, and
    # their records would say "running". It stops them through STOP instead, and is raised
    # (and caught) once every arm has recorded its end.
    with metrics.hooked(epoch_start=hook, batch_start=stop_here):
        try:
            with signals.deferred():
                workers = [
                    threading.Thread(target=run, name=n, args=(n, j)) for n, j in jobs.items()
                ]
                for t in workers:
                    t.start()
                for t in workers:
                    while t.is_alive():  # in slices, so that a signal is seen at once
                        t.join(0.2)
                        if signals.received():
                            STOP.set()
                        if STOP.is_set():
                            with turns.cond:
                                turns.cond.notify_all()  # a waiting arm wakes, and stops
        except KeyboardInterrupt:
            STOP.set()
    return out
