"""One process of `ampcompare bench`: the arms of each measurement run as threads of this
process that take turns epoch by epoch, and every round's step times are written to
rounds.json for the bench (ampcompare/bench.py) to pool over its processes.

Epoch k of every arm runs before epoch k + 1 of any, in an order that rotates each round. Each
timed epoch is a round; a round's arms ran within seconds of each other, so a burst of machine
noise falls on all of them and a ratio taken round by round cancels it. A control arm, the
plain loop a second time, is measured by the same procedure. Each arm is imported here, when
a bench process runs: they take turns in one process on purpose.

- linear: every framework and the control with the `linear` model (next to no compute, so
  that the framework dominates) at one thread (a framework's own work is single-threaded).
- small: the plain loop at 32-true, bf16-mixed and 32-true again (the control) with the small
  CNN, with each step's wait for data.
- loader: per-image times of the common pipeline and of a torchvision DataLoader with
  RandomCrop(32, 4) + RandomHorizontalFlip + Normalize and 2 workers, both only iterating.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import types

import torch

from accelerate_impl import train as accelerate
from ampcompare import quiet
from common import data, metrics
from record import signals
from common.config import Config
from common.device import resolve_device
from record.environment import environment
from record.files import write_json
from fabric_impl import train as fabric
from lightning_impl import train as lightning
from plain_torch import train as plain

quiet.frameworks()  # they are all imported now

ARMS = {"plain": plain, "lightning": lightning, "fabric": fabric, "accelerate": accelerate}
# The arms of the framework measurements: the control is the plain loop once more.
FRAMEWORKS = {
    "plain": "plain",
    "lightning": "lightning",
    "fabric": "fabric",
    "accelerate": "accelerate",
    "control": "plain",
}


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


@dataclasses.dataclass
class Job:
    impl: str
    cfg: Config


STOP = threading.Event()  # set by a signal: every arm stops at its next step


def take_turns(jobs: dict, threads: int) -> dict:
    """Run every job's train(cfg) in a thread of its own, epoch by epoch in turn, each with an
    OpenMP team of `threads`; their results, by name. (Lightning registers signal handlers only
    from the main thread.) After a signal each arm stops at its next step, as a run stops on
    Ctrl-C: its record says interrupted."""
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
            out[name] = ARMS[job.impl].train(job.cfg)
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

    with metrics.hooked(epoch_start=hook, batch_start=stop_here):
        workers = [threading.Thread(target=run, name=n, args=(n, j)) for n, j in jobs.items()]
        for t in workers:
            t.start()
        for t in workers:
            while t.is_alive():  # in slices, so that a signal's handler runs at once
                try:
                    t.join(0.2)
                except KeyboardInterrupt:
                    STOP.set()
                if STOP.is_set():
                    with turns.cond:
                        turns.cond.notify_all()  # a waiting arm wakes, and stops
    return out


def rounds(result, key: str = "step_times_s") -> list[list[float]]:
    """A run's timed epochs, one list of per-step values each: the bench's rounds."""
    return [e[key] for e in result.epochs if not e["warmup"]]


def failure(results: dict):
    """The first arm's error line, or None when every arm ended ok."""
    bad = [r for r in results.values() if r.status != "ok"]
    return (bad[0].error or bad[0].status) if bad else None


def side_by_side(base: Config, folder: str, arms: dict, tag: str, threads: int) -> dict:
    """Run `arms` ({name: (impl, precision)}) in turns: each arm's rounds by name, or the
    error that stopped one of them ({"error": ...})."""
    jobs = {
        n: Job(
            impl,
            dataclasses.replace(base, precision=p, run_id=f"{tag}-{n}", out_dir=folder),
        )
        for n, (impl, p) in arms.items()
    }
    res = take_turns(jobs, threads)
    why = failure(res)
    if why:
        return {"error": why}
    out = {n: rounds(r) for n, r in res.items()}
    if "32-true" in res:
        out["waits"] = rounds(res["32-true"], "step_waits_s")
        out["activation_ratio"] = (
            res["bf16-mixed"].summary["activation_bytes"]
            / res["32-true"].summary["activation_bytes"]
        )
    return out


def linear(base: Config, folder: str, n: int) -> dict:
    """Every framework and the control with the linear model at one thread, n timed rounds."""
    cfg = dataclasses.replace(base, model="linear", epochs=n + 1, precision="32-true")
    arms = {name: (impl, "32-true") for name, impl in FRAMEWORKS.items()}
    return side_by_side(cfg, folder, arms, "linear", threads=1)


def small(base: Config, folder: str, n: int, threads: int) -> dict:
    """The plain loop with the small CNN at 32-true, bf16-mixed and 32-true again."""
    cfg = dataclasses.replace(base, model="small", epochs=n + 1)
    arms = {
        "32-true": ("plain", "32-true"),
        "bf16-mixed": ("plain", "bf16-mixed"),
        "control": ("plain", "32-true"),
    }
    return side_by_side(cfg, folder, arms, "small", threads)


def loaders(base: Config, n: int) -> dict:
    """Per-image times of each batch of the common loader and of torchvision's, 4 n rounds
    (an epoch of theirs is half a second)."""
    sets = data.load(base)
    ours, _ = data.loaders(base, sets, resolve_device(base), channels_last=False)
    theirs = _torchvision_loader(base, sets[0])
    pairs = []
    try:
        _batch_times(theirs, 0)  # start the workers
        pairs = [(_batch_times(ours, r), _batch_times(theirs, r)) for r in range(4 * n)]
    except RuntimeError:  # its workers stopped by the same signal
        if not STOP.is_set():
            raise
    if STOP.is_set():
        return {"error": "interrupted"}
    return {"ours": [p[0] for p in pairs], "theirs": [p[1] for p in pairs]}


def _torchvision_loader(base: Config, train):
    """torchvision's own CIFAR10 pipeline over the same images: one PIL image at a time."""
    import torchvision.transforms as T
    from torch.utils.data import DataLoader, Dataset

    images = train.images.permute(0, 2, 3, 1).numpy()  # HWC uint8, as torchvision's CIFAR10
    labels = train.labels.tolist()
    transform = T.Compose(
        [
            T.ToPILImage(),
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(data.MEAN, data.STD),
        ]
    )

    class Pil(Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return transform(images[i]), labels[i]

    return DataLoader(
        Pil(),
        batch_size=base.batch_size,
        shuffle=True,
        num_workers=2,
        persistent_workers=True,
        generator=torch.Generator().manual_seed(0),
    )


def _batch_times(loader, epoch) -> list:
    """Seconds per image of each batch of one pass (cut short by a stop)."""
    if hasattr(loader.batch_sampler.sampler, "set_epoch"):  # ours; torchvision's reshuffles
        loader.batch_sampler.sampler.set_epoch(epoch)
    times, last = [], time.perf_counter()
    for _, y in loader:  # per image, so that a short last batch counts for what it is
        if STOP.is_set():
            return times
        now = time.perf_counter()
        times.append((now - last) / len(y))
        last = now
    return times


def run(rounds: int, linear_rounds: int, base: Config) -> int:
    """This process's share of the bench into base.out_dir: rounds.json holds every round of
    every measure (or why one failed), and each arm's run folder its record. Exit code 0, or
    130 when a signal stopped it (what was measured is kept)."""
    device = resolve_device(base)
    threads = torch.get_num_threads()
    out = {"rounds": rounds, "linear_rounds": linear_rounds, "threads": threads}
    took = {}

    def phase(name, measure):
        if not STOP.is_set():
            start = time.monotonic()
            try:
                out[name] = measure()
            except KeyboardInterrupt:
                STOP.set()
            took[name] = round(time.monotonic() - start, 1)
        if STOP.is_set() and name not in out:
            out[name] = {"error": "interrupted"}

    # Ctrl-C, SIGTERM, SIGHUP: the arms stop at their next step and record it, the measures
    # so far are written, and a second signal is absorbed.
    with signals.listening(STOP.set):
        phase("linear", lambda: linear(base, base.out_dir, linear_rounds))
        phase("small", lambda: small(base, base.out_dir, rounds, threads))
        phase("loader", lambda: loaders(base, rounds))
    signals.absorb_from_now()  # from here on a signal interrupts nothing
    env = environment(device, {})
    out.update(
        seconds=took,
        interrupted=STOP.is_set(),
        env={k: env.get(k) for k in ("device_name", "torch", "lightning", "accelerate")},
    )
    write_json(os.path.join(base.out_dir, ROUNDS), out)
    return 130 if STOP.is_set() else 0


ROUNDS = "rounds.json"
