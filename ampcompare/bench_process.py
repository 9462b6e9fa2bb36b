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
import time

import torch

from accelerate_impl import train as accelerate
from ampcompare import quiet, turns
from common import data
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


@dataclasses.dataclass
class Job:
    impl: str
    cfg: Config


def _trainer(job: Job):
    return lambda: ARMS[job.impl].train(job.cfg)


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
    res = turns.take_turns({n: _trainer(j) for n, j in jobs.items()}, threads)
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
        if not turns.STOP.is_set():
            raise
    if turns.STOP.is_set():
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
        if turns.STOP.is_set():
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
        if not turns.STOP.is_set():
            start = time.monotonic()
            try:
                out[name] = measure()
            except KeyboardInterrupt:
                turns.STOP.set()
            took[name] = round(time.monotonic() - start, 1)
        if turns.STOP.is_set() and name not in out:
            out[name] = {"error": "interrupted"}

    # Ctrl-C, SIGTERM, SIGHUP: the arms stop at their next step and record it, the measures
    # so far are written, and a second signal is absorbed.
    with signals.listening(turns.STOP.set):
        phase("linear", lambda: linear(base, base.out_dir, linear_rounds))
        phase("small", lambda: small(base, base.out_dir, rounds, threads))
        phase("loader", lambda: loaders(base, rounds))
    signals.absorb_from_now()  # from here on a signal interrupts nothing
    env = environment(device, {})
    out.update(
        seconds=took,
        interrupted=turns.STOP.is_set(),
        env={k: env.get(k) for k in ("device_name", "torch", "lightning", "accelerate")},
    )
    write_json(os.path.join(base.out_dir, ROUNDS), out)
    return 130 if turns.STOP.is_set() else 0


ROUNDS = "rounds.json"
