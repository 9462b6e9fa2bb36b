"""`make bench`: what each framework costs per step, and the ratios around it, measured side by
side in one process on this machine, each with its 95% interval and a verdict in words.

    .venv/bin/ampcompare bench                           # CPU, about 3 minutes
    .venv/bin/ampcompare bench --rounds 10 --accelerator cuda

How it measures. The arms of a measurement run as threads of one process that take turns epoch
by epoch: epoch k of every arm runs before epoch k + 1 of any, in an order that rotates each
round. Each timed epoch is a round; a round's arms ran within seconds of each other, so a burst
of machine noise (here, a fresh process ran up to 40% slower than the next) falls on all of
them, and the paired bootstrap (common/stats.py: rounds drawn, then blocks of steps within each
round) cancels it. A control arm, the plain loop a second time, is measured by the same
procedure: plain against plain must show no difference, its interval's width is the noise floor
of every other figure, and a bias of the procedure (the threads' start order) would show there.

- lightning_cost_per_step, fabric_cost_per_step, accelerate_cost_per_step: the step time each
  framework adds to the plain loop, in µs, with the `linear` model (a linear classifier: next
  to no compute, so that the framework dominates) and one thread (a framework's own work is
  single-threaded Python).
  control_cost_per_step and control_ratio: plain against plain, the same way. Target for
  Lightning's: an interval that excludes 0, half as wide as the estimate at most (±25%).
- lightning_cost_share_of_small_step, fabric_..., accelerate_...: that cost as a share of the
  small CNN's step (batch 256), where a step is mostly arithmetic: what a user of a real model
  pays. A ratio of small-CNN step times cannot show it: its control's interval is wider than the
  whole effect.
- bf16_over_fp32: step time of bf16-mixed over 32-true (plain loop, small CNN), beside
  control_over_fp32 (32-true against itself: the noise floor of that ratio), and the activation
  memory ratio.
- data_wait_fraction: the share of a training step spent waiting for data, with the common
  pipeline (plain loop, small CNN, batch 256). Target: at most 0.02.
- loader_over_torchvision: images/s of the common pipeline (batched crop, flip and normalise as
  tensor ops, order and draws from (seed, epoch)) over a torchvision DataLoader with
  RandomCrop(32, 4) + RandomHorizontalFlip + Normalize and 2 workers, both only iterating.
  Target: at least 20.

Why threads of one process, not a fresh process per arm: measured here with the linear model,
three rounds of fresh processes put plain against plain at −315 µs [−950, +190] (a noise floor
about 1100 µs wide), while 60 rounds of threads put it at +7 µs [−114, +129].
A figure whose interval holds both sides of its target says so, not a bare pass or fail.
Everything lands in --out-dir (default runs/bench): bench.json, and every run's result.json.
Each arm is imported here, when the bench runs: they take turns in one process on purpose.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
import types

import torch

from accelerate_impl import train as accelerate
from ampcompare import plan, quiet  # plan: the run folder
from common import console, data, metrics, signals, stats
from common.config import Config
from common.device import resolve_device
from common.environment import environment
from common.rundir import check_out_dir
from common.files import write_json
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

    metrics.epoch_start_hooks.append(hook)
    metrics.batch_start_hooks.append(stop_here)
    try:
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
    finally:
        metrics.epoch_start_hooks.remove(hook)
        metrics.batch_start_hooks.remove(stop_here)
    return out


def rounds(result, key: str = "step_times_s") -> list[list[float]]:
    """A run's timed epochs, one list of per-step values each: the bench's rounds."""
    return [e[key] for e in result.epochs if not e["warmup"]]


def failure(results: dict):
    """The first arm's error line, or None when every arm ended ok."""
    bad = [r for r in results.values() if r.status != "ok"]
    return (bad[0].error or bad[0].status) if bad else None


def side_by_side(base: Config, folder: str, arms: dict, tag: str, threads: int):
    """Run `arms` ({name: impl}) in turns; their samples by name (one run per round), or the
    error that stopped one of them."""
    jobs = {
        n: Job(impl, dataclasses.replace(base, run_id=f"{tag}-{n}", out_dir=folder))
        for n, impl in arms.items()
    }
    res = take_turns(jobs, threads)
    why = failure(res)
    if why:
        return None, why, res
    return {n: stats.Sample(rounds(r), f"{tag} {n}") for n, r in res.items()}, None, res


def figure(
    est: stats.Estimate, words: str, unit: str = "", scale: float = 1.0, target=None
) -> dict:
    out = {
        "estimate": est.value * scale,
        "interval": [est.lo * scale, est.hi * scale],
        "rounds": est.runs[0],
        "unit": unit,
        "verdict": words,
    }
    if target is not None:
        out.update(target=target[0], target_verdict=stats.against(est, *target))
    return out


def framework_cost(base: Config, folder: str, n: int, report: dict) -> None:
    """µs a step that each framework adds to the plain loop, with the linear model."""
    cfg = dataclasses.replace(base, model="linear", epochs=n + 1)
    samples, why, _ = side_by_side(cfg, folder, FRAMEWORKS, "linear", threads=1)
    names = (
        "lightning_cost_per_step",
        "fabric_cost_per_step",
        "accelerate_cost_per_step",
        "control_cost_per_step",
        "control_ratio",
    )
    if why:
        report.update({k: {"error": why} for k in names})
        return None
    ref = samples["plain"]
    for arm in ("lightning", "fabric", "accelerate", "control"):
        est = stats.difference(samples[arm], ref, paired=True)
        report[f"{arm}_cost_per_step"] = figure(
            est, stats.overhead_words(est, ref.value), "µs", 1e6
        )
    est = stats.ratio(samples["control"], ref, paired=True)
    report["control_ratio"] = figure(est, stats.time_ratio_words(est))
    report["control_ratio"]["target_verdict"] = (
        "holds: its interval contains 1"
        if est.contains(1.0)
        else "FAILS: plain against plain should show no difference; the method is biased here"
    )
    lightning_cost = report["lightning_cost_per_step"]
    lo, hi = lightning_cost["interval"]
    half = (
        (hi - lo) / 2 / abs(lightning_cost["estimate"]) if lightning_cost["estimate"] else None
    )
    lightning_cost["half_width_share"] = half
    lightning_cost["target_verdict"] = (
        f"resolved: excludes 0, half-width {half:.0%} of the estimate (target ≤ 25%)"
        if lo > 0 and half is not None and half <= 0.25
        else f"not resolved: interval [{lo:.0f}, {hi:.0f}] µs, half-width "
        f"{'–' if half is None else f'{half:.0%}'} of the estimate (target: excludes 0, ≤ 25%)"
    )
    return samples


def cost_shares(linear: dict, small: stats.Sample, report: dict) -> None:
    """The linear model's cost per step as a share of the small CNN's 32-true step: what the
    framework costs where a step does real work. (A ratio of small-CNN step times cannot
    resolve it: the control's interval there is wider than the whole effect.)"""
    for arm in ("lightning", "fabric", "accelerate"):
        est = stats.share(linear[arm], linear["plain"], small, paired=True)
        report[f"{arm}_cost_share_of_small_step"] = figure(
            est,
            f"{est.value:.2%} of the small CNN's {stats.duration(small.value)} step "
            f"{stats.span(est.lo * 100, est.hi * 100)}%",
            "share",
        )


def loaders(base: Config, n: int, report: dict) -> None:
    """Per-batch times of the common loader and of torchvision's, round by round."""
    sets = data.load(base)
    ours, _ = data.loaders(base, sets, resolve_device(base), channels_last=False)
    theirs = _torchvision_loader(base, sets[0])
    try:
        _batch_times(theirs, 0)  # start the workers
        pairs = [(_batch_times(ours, r), _batch_times(theirs, r)) for r in range(4 * n)]
    except RuntimeError:  # its workers stopped by the same signal
        if not STOP.is_set():
            raise
    if STOP.is_set():
        report["loader_over_torchvision"] = {"error": "interrupted"}
        return
    a = stats.Sample([p[0] for p in pairs], "loader ours")
    b = stats.Sample([p[1] for p in pairs], "loader torchvision")
    # their time per image over ours: our speed over theirs
    est = stats.ratio(b, a, paired=True)
    report["loader_over_torchvision"] = figure(est, stats.speed_words(est), target=(20, False))
    for name, sample in (("loader_images_per_s", a), ("torchvision_images_per_s", b)):
        e = sample.estimate()
        report[name] = figure(
            stats.Estimate(1 / e.value, 1 / e.hi, 1 / e.lo, e.runs), "measured", "images/s"
        )


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


def precisions(base: Config, folder: str, n: int, threads: int, report: dict):
    """bf16-mixed against 32-true, plain against plain (the control) and the data wait, with
    the plain loop and the small CNN; returns the 32-true sample."""
    cfg = dataclasses.replace(base, model="small", epochs=n + 1)
    arms = {"32-true": "32-true", "bf16-mixed": "bf16-mixed", "control": "32-true"}
    jobs = {
        name: Job(
            "plain",
            dataclasses.replace(cfg, precision=p, run_id=f"small-{name}", out_dir=folder),
        )
        for name, p in arms.items()
    }
    res = take_turns(jobs, threads)
    why = failure(res)
    if why:
        for name in ("bf16_over_fp32", "control_over_fp32", "data_wait_fraction"):
            report[name] = {"error": why}
        return None
    fp32, bf16, control = (stats.Sample(rounds(res[name]), f"small {name}") for name in arms)
    est = stats.ratio(bf16, fp32, paired=True)
    report["bf16_over_fp32"] = figure(est, stats.time_ratio_words(est))
    est = stats.ratio(control, fp32, paired=True)
    report["control_over_fp32"] = figure(est, stats.time_ratio_words(est))
    report["control_over_fp32"]["target_verdict"] = (
        "holds: its interval contains 1"
        if est.contains(1.0)
        else "FAILS: plain against plain should show no difference; the ratios above it are "
        "narrower than this machine's noise"
    )
    report["bf16_over_fp32_activation_memory"] = (
        res["bf16-mixed"].summary["activation_bytes"]
        / res["32-true"].summary["activation_bytes"]
    )
    waits = stats.Sample(rounds(res["32-true"], "step_waits_s"), "small waits")
    est = stats.ratio(waits, fp32, paired=True)
    report["data_wait_fraction"] = figure(
        est,
        f"{est.value:.2%} of a step waits for data {stats.span(est.lo * 100, est.hi * 100)}%",
        target=(0.02, True),
    )
    return fp32


def run(rounds: int, linear_rounds: int, base: Config) -> int:
    """Every measurement, into a compare-style folder under base.out_dir; print the table and
    write bench.json. The exit code: 0, or 130 when a signal stopped it (what was measured is
    kept)."""
    device = resolve_device(base)
    check_out_dir(base.out_dir)
    folder = plan.new_folder(base.out_dir)
    threads = torch.get_num_threads()
    report = {"command": " ".join(sys.argv), "rounds": rounds, "linear_rounds": linear_rounds}
    # Ctrl-C, SIGTERM, SIGHUP: the arms stop at their next step and record it (a framework
    # that fails while it stops is recorded as interrupted too: the signal came first), the
    # measures so far are written, and a second signal is absorbed.
    signals.listeners.append(STOP.set)
    took, samples = {}, {}

    def phase(name, measure):
        if not STOP.is_set():
            start = time.monotonic()
            try:
                samples[name] = measure()
            except KeyboardInterrupt:
                STOP.set()
            took[name] = round(time.monotonic() - start, 1)

    phase("framework_cost", lambda: framework_cost(base, folder, linear_rounds, report))
    phase("precisions", lambda: precisions(base, folder, rounds, threads, report))
    if samples.get("framework_cost") and samples.get("precisions") and not STOP.is_set():
        cost_shares(samples["framework_cost"], samples["precisions"], report)
    # 4 x --rounds: an epoch of theirs is half a second
    phase("loaders", lambda: loaders(base, rounds, report))
    # From here on a signal interrupts nothing: the report is written whole.
    signals.absorb_from_now()
    report["seconds"] = took
    report["interrupted"] = STOP.is_set()
    env = environment(device, {})
    report["env"] = {k: env.get(k) for k in ("device_name", "torch", "lightning", "accelerate")}
    report["env"]["threads"] = threads
    write_json(os.path.join(base.out_dir, "bench.json"), report)
    console.say(table(report))
    console.say(
        f"\n{report['env']['device_name']}, {threads} threads (1 for the linear "
        f"model), torch {report['env']['torch']}, lightning "
        f"{report['env']['lightning']}, accelerate {report['env']['accelerate']}; "
        f"{base.out_dir}/bench.json, runs in {folder}"
    )
    if STOP.is_set():
        console.say(
            f"ampcompare: bench interrupted; {base.out_dir}/bench.json holds what was measured",
            err=True,
        )
        return 130
    return 0


def table(report: dict) -> str:
    lines = [f"{'measure':<34} {'estimate [95% interval]':<28} verdict"]
    for name, value in report.items():
        if isinstance(value, float):
            lines.append(f"{name:<34} {value:<28.3f} measured")
        if not isinstance(value, dict) or name in ("env", "seconds"):
            continue
        if "error" in value:
            lines.append(f"{name:<34} failed: {value['error']}")
            continue
        lo, hi = value["interval"]
        digits = 0 if value["unit"] in ("µs", "images/s") else 4 if value["unit"] else 3
        est = (
            f"{value['estimate']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}] {value['unit']}"
        )
        verdict = value["verdict"] + (
            f"; {value['target_verdict']}" if value.get("target_verdict") else ""
        )
        lines.append(f"{name:<34} {est:<28} {verdict}")
    return "\n".join(lines)
