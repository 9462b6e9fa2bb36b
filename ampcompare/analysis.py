"""What a set of run records says, before it is rendered: the records read from their
folders (each once, however many paths lead to it), grouped by machine and settings, each
arm's cell with its spreads and step-time sample, the ratios and overheads between arms with
their intervals and verdicts, and the notes a table needs. report.py renders it."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os

import numpy as np

from ampcompare import explain
from ampcompare.findings import (
    Cell,
    Group,
    Judged,
    OrderEffect,
    Overhead,
    Ratio,
    Sharded,
    ShardedRow,
    Summary,
)
from record import results, rundir, schema, summary
from ampcompare import stats
from common import config
from common.precision import CANONICAL

METRICS = (
    "median_step_time_s",
    "median_epoch_time_s",
    "images_per_s",
    "achieved_tflops",
    "mfu",
    "data_wait_fraction",
    "activation_bytes",
    summary.MODEL_STATE,
    *summary.STATE_BYTES.values(),
    "peak_memory_bytes",
    "peak_beyond_data_bytes",
    "skipped_steps",
    "loss_scale_first",
    "loss_scale_last",
    "final_test_acc",
)


IMPL_ORDER = (
    "plain",
    "plain (control)",
    "lightning",
    "fabric",
    "accelerate",
    "apex",
    "apex (O0)",
    "apex (O1)",
    "apex (O2: fp16 model, fp32 master weights)",
    "apex (O3)",
)
# O2 is a rung of its own, between 16-mixed and 16-true: its row says so, wherever it is shown
OPT_LEVEL_NAMES = {"O2": "O2: fp16 model, fp32 master weights"}


def load(folders, skipped: list | None = None) -> list[results.RunResult]:
    """Every run record under the folders, each run once. A result.json that cannot be read,
    is not a run record, holds a step time that is not a finite number above zero, or is a
    copy of a run already read (the same run_id, host, process and start) is left out, and
    (path, reason) appended to `skipped`."""
    records, seen, runs = [], set(), {}
    for folder in folders:
        for path in result_files(folder):
            real = os.path.realpath(path)
            if real in seen:  # a run is one run, however many of the folders reach it
                continue
            seen.add(real)
            try:
                record = results.RunResult.read(os.path.dirname(path))
                why = unusable_steps(record)
            except OSError as e:
                why = f"unreadable ({e})"
            except results.NotARecord as e:
                why = str(e)
            if not why:
                first = runs.setdefault(identity(record), path)
                if first != path:
                    why = f"a copy of {first} (the same run: run_id, host, process and start)"
            if why:
                if skipped is not None:
                    skipped.append((path, why))
                continue
            record.found_at = os.path.relpath(path, folder)
            records.append(ended(record, os.path.dirname(path)))
    return records


def ended(record: results.RunResult, run_dir: str) -> results.RunResult:
    """The record as the report tells it: one left at "running" whose process is gone (its
    folder's lock is free: killed, or the machine went down) ended without recording how,
    and is reported as failed, with what it measured."""
    if record.status != "running" or rundir.held(run_dir):
        return record
    return dataclasses.replace(
        record,
        status="failed",
        error="its process ended without recording how (killed, or the machine stopped); "
        "what it measured is kept",
    )


DEPTH = 32  # how deep below a folder a result.json is looked for


def result_files(folder: str) -> list[str]:
    """The result.json files below folder, sorted, following links but no folder twice (a
    link to a folder above it would otherwise be walked without end), and none deeper than
    DEPTH; hidden folders (.superseded, .warmup) are passed over, as glob's ** does."""
    found, walked = [], set()
    queue = collections.deque([(folder, 0)])  # breadth first: a folder before a link to it
    while queue:
        path, depth = queue.popleft()
        real = os.path.realpath(path)
        if real in walked or depth > DEPTH:
            continue
        walked.add(real)
        try:
            entries = sorted(os.scandir(path), key=lambda e: (e.is_symlink(), e.name))
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    queue.append((entry.path, depth + 1))
                elif entry.name == "result.json" and entry.is_file():
                    found.append(entry.path)
            except OSError:
                continue
    return sorted(found)


def unusable_steps(record: results.RunResult) -> str | None:
    """Why a record's step times cannot be averaged (one that is null, NaN, infinite, zero,
    negative or below a nanosecond), or None."""
    for e in record.epochs:
        times = e.get("step_times_s")
        if times is None:
            continue
        if not isinstance(times, list) or not stats.usable(times):
            bad = next((t for t in times if not stats.usable([t])), times)
            return (
                f"epoch {e.get('epoch')} holds a step time that is not a number from "
                f"{stats.SHORTEST_STEP:g} s to under {stats.LONGEST_STEP:g} s "
                f"({schema.shown(json.dumps(bad))})"
            )
        if isinstance(e.get("steps"), int) and len(times) != e["steps"]:
            return (
                f"epoch {e.get('epoch')} holds {len(times)} step times for {e['steps']} steps"
            )
    return None


def identity(record: results.RunResult) -> tuple:
    """What makes a run the same run wherever its folder was copied: its run_id, host,
    process, start and (for records older than the start time) its first epoch's steps."""
    env, first = record.env, (record.epochs or [{}])[0].get("step_times_s")
    return (
        record.run_id,
        env.get("host"),
        env.get("pid", record.pid),
        env.get("started"),
        json.dumps(first),
    )


def device_of(record: results.RunResult) -> str:
    return f"{record.env.get('device_name', '?')} ({record.env.get('device', '?')})"


def precision_of(record: results.RunResult) -> str:
    return record.precision.ran


# What a run was measured with, beside its device: runs whose software, code, host or thread
# count differ are different settings, never one cell.
SOFTWARE = (
    "torch",
    "torchvision",
    "lightning",
    "accelerate",
    "apex",
    "python",
    "git_commit",
    "host",
)


MACHINE = ("threads",)


CONTROL = "plain (control)"


def software_of(record) -> dict:
    """Its software, code, host and threads, and the source of its model where it is the
    user's own."""
    return {
        **{k: record.env.get(k) for k in (*SOFTWARE, *MACHINE)},
        "model_source_sha256": (record.model or {}).get("source_sha256"),
    }


def settings_of(record) -> dict:
    """What the run computed with: the options config.py declares settings (the others name a
    run, or are the tables' own axes, precision and opt level). An option the record predates
    ran at today's default."""
    options = {**config.Config().to_dict(), **record.config}
    return {k: options[k] for k in sorted(config.names(setting=True))}


def arm_of(record) -> str:
    """Its impl, or "plain (control)" for the plain loop run again as a comparison's noise
    floor (only the plain loop is one)."""
    control = record.config.get("role") == "control" and record.impl == "plain"
    return CONTROL if control else record.impl


def label_of(record) -> str:
    """The row a run belongs to: its arm, and apex's opt level (O1 and O2 are not averaged; O2
    is named for what it is)."""
    level = record.opt_level
    return (
        f"{arm_of(record)} ({OPT_LEVEL_NAMES.get(level, level)})" if level else arm_of(record)
    )


def seed_of(record: results.RunResult):
    """Its seed (a record older than the field: its config's)."""
    return record.seed if record.seed is not None else record.config.get("seed")


def sample_of(runs, name: str) -> stats.Sample:
    """The timed step times of each run (summary.timed_steps)."""
    return stats.Sample([summary.timed_steps(r.epochs)[0] for r in runs], name)


def _order(names, canonical=()):
    return sorted(
        set(names),
        key=lambda n: (list(canonical).index(n) if n in canonical else len(canonical), n),
    )


def groups_of(records) -> list[tuple[str, dict, list]]:
    """(device, settings and software, records) per device, settings and software, in the
    order first seen."""
    groups = {}
    for r in records:
        settings = {**settings_of(r), **software_of(r)}
        key = (device_of(r), json.dumps(settings, sort_keys=True, default=str))
        groups.setdefault(key, (key[0], settings, []))[2].append(r)
    return list(groups.values())


def _differences(groups) -> dict:
    """For each group, the settings or software in which it differs from another group of its
    device."""
    out = {}
    for i, (device, settings, _) in enumerate(groups):
        others = [s for j, (d, s, _) in enumerate(groups) if d == device and j != i]
        out[i] = {k: v for k, v in settings.items() if any(o.get(k) != v for o in others)}
    return out


def ok_runs(runs) -> list[results.RunResult]:
    return [r for r in runs if r.status == "ok"]


def _cell(runs, sample: stats.Sample, noise: stats.Noise) -> Cell:
    """One table cell: every run of one arm at one precision and settings. Step time is the
    geometric mean of the ok runs' medians, its interval from the noise pooled over the whole
    comparison; other timings spread over repeats and seeds; accuracy over seeds (each seed's
    median over its repeats: a repeat with the same seed trains the same weights)."""
    good = ok_runs(runs)
    metrics = {m: stats.spread([r.summary.get(m) for r in good]) for m in METRICS}
    per_seed = {}
    for r in good:
        per_seed.setdefault(seed_of(r), []).append(r.summary.get("final_test_acc"))
    seeds = [stats.spread(v) for v in per_seed.values()]
    metrics["final_test_acc"] = stats.spread([s.median for s in seeds if s])
    return Cell(
        impl=arm_of(runs[0]),
        runs=len(runs),
        ok=len(good),
        opt_level=runs[0].opt_level,
        metrics=metrics,
        seeds=len(per_seed),
        step_time_s=stats.level(sample, noise) if sample else None,
        weights=sorted({r.weights_sha256 or "" for r in good}),
    )


def summarize(records) -> Summary:
    groups = groups_of(records)
    differences = _differences(groups)
    out = []
    for i, (device, settings, recs) in enumerate(groups):
        ok = ok_runs(recs)
        cells = {}
        for r in recs:
            cells.setdefault(precision_of(r), {}).setdefault(label_of(r), []).append(r)
        samples = {
            (p, label): sample_of(ok_runs(runs), f"{device} {p} {label}")
            for p, per in cells.items()
            for label, runs in per.items()
        }
        noise = stats.Noise.pooled(samples.values())
        table = {
            precision: {
                label: _cell(cells[precision][label], samples[precision, label], noise)
                for label in _order(cells[precision], IMPL_ORDER)
            }
            for precision in _order(cells, CANONICAL)
        }
        diff = differences[i]
        name = device + (" — " + ", ".join(f"{k} {v}" for k, v in diff.items()) if diff else "")
        own = (*SOFTWARE, *MACHINE, "model_source_sha256")
        group = Group(
            device=name,
            env=(ok or recs)[0].env,
            config=(ok or recs)[0].config,
            settings={k: v for k, v in settings.items() if k not in own},
            software={k: settings[k] for k in own},
            noise=noise,
            precisions=table,
        )
        _verdicts(group, samples, noise)
        group.order = order_effect([r for r in ok if r.epochs], samples, noise)
        group.notes = notes(group)
        group.explanations = explain.lines(group)
        out.append(group)
    raw = [device for device, _, _ in groups]
    return Summary(results.SCHEMA, out, sharded_against_ddp(out, raw))


def sharded_against_ddp(groups: list[Group], devices: list[str]) -> list[Sharded]:
    """Each group of FSDP runs against the group of DDP runs on the same device with the same
    settings and software otherwise: every arm's model state per rank over the plain loop's
    under DDP, part by part, and whether it trained DDP's weights."""
    out = []
    for g, device in zip(groups, devices):
        if g.settings.get("strategy") != "fsdp":
            continue
        twin = {**g.settings, "strategy": "ddp"}
        ddp = next(
            (
                h
                for h, d in zip(groups, devices)
                if d == device and h.settings == twin and h.software == g.software
            ),
            None,
        )
        if ddp is None:
            continue
        rows = [
            _sharded_row(label, precision, cell, ddp.precisions[precision]["plain"])
            for precision, cells in g.precisions.items()
            if "plain" in ddp.precisions.get(precision, {})
            for label, cell in cells.items()
            if label != CONTROL
        ]
        out.append(Sharded(g.device, ddp.device, rows))
    return out


def _sharded_row(label: str, precision: str, cell: Cell, ddp: Cell) -> ShardedRow:
    weighed = all(cell.weights + ddp.weights) and cell.weights and ddp.weights
    same = cell.weights == ddp.weights if weighed else None
    return ShardedRow(label, precision, _state_over(cell, ddp), same)


def _state_over(cell: Cell, ref: Cell) -> dict[str, float | None]:
    """Each part of the model state, and their sum, in `cell` over `ref`."""
    return {
        name: _over(cell.median(name), ref.median(name))
        for name in (summary.MODEL_STATE, *summary.STATE_BYTES.values())
    }


def _verdicts(group: Group, samples, noise) -> None:
    """The group's speed-ups and framework costs. When plain against itself (the control)
    claims a difference, this machine's noise exceeded the method: every figure is then given
    with its interval and no verdict."""
    table = group.precisions
    group.overheads = _overheads(table, samples, noise)
    claimed = [
        (precision, per[CONTROL])
        for precision, per in group.overheads.items()
        if CONTROL in per and per[CONTROL].estimate.claims(0.0)
    ]
    group.control_claims = [f"{p}: {o.verdict}" for p, o in claimed]
    hold = NOISE_EXCEEDED if claimed else None
    if hold:
        group.overheads = _overheads(table, samples, noise, hold)
    group.ratios = _ratios(table, samples, noise, hold)


NOISE_EXCEEDED = "no verdict: plain against itself showed a difference here"


def _held(est: stats.Estimate, hold) -> stats.Estimate:
    return dataclasses.replace(est, short=est.short or hold) if hold else est


def _ratios(table, samples, noise, hold=None) -> dict[str, dict[str, Ratio]]:
    """Mixed precision against 32-true per row: the speed-up (32-true's step time over the
    mixed one's, with its interval and verdict), memory ratios, and the accuracy change beside
    the seed-to-seed spread. The 32-true run of the same arm is the reference (apex: O0,
    whatever the mixed opt level)."""
    base = {c.impl: label for label, c in table.get("32-true", {}).items()}
    rows = [
        (precision, label, base[cell.impl])
        for precision, impls in table.items()
        if precision != "32-true"
        for label, cell in impls.items()
        if cell.impl in base and cell.ok and table["32-true"][base[cell.impl]].ok
    ]
    confidence = stats.family(len(rows))  # the table's verdicts, judged together
    ratios = {}
    for precision, label, ref_label in rows:
        cell, ref = table[precision][label], table["32-true"][ref_label]
        a, b = samples["32-true", ref_label], samples[precision, label]
        speedup = _held(stats.ratio(a, b, noise, confidence), hold) if a and b else None
        x, y = cell.metrics["final_test_acc"], ref.metrics["final_test_acc"]
        seeds = min(cell.seeds, ref.seeds)
        ratios.setdefault(label, {})[precision] = Ratio(
            speedup=Judged(speedup, confidence, stats.speed_words(speedup))
            if speedup
            else None,
            **{
                metric: _over(cell.median(metric), ref.median(metric))
                for metric in (
                    "activation_bytes",
                    "peak_memory_bytes",
                    "peak_beyond_data_bytes",
                )
            },
            state=_state_over(cell, ref),
            accuracy_change=x.median - y.median if x and y else None,
            seeds=seeds,
            seed_spread=max(x.max - x.min, y.max - y.min) if x and y and seeds > 1 else None,
        )
    return ratios


def _over(x, y):
    return x / y if x is not None and y else None


def _overheads(table, samples, noise, hold=None) -> dict[str, dict[str, Overhead]]:
    """Per precision, what each arm adds to a step over the plain loop at the same precision:
    the difference of step times, with its interval, as time and as a share. The control
    (plain again) comes first: its row is the report's own noise floor."""
    out = {}
    rows = [
        (precision, label)
        for precision, impls in table.items()
        if "plain" in impls and samples.get((precision, "plain"))
        for label in sorted(impls, key=lambda k: k != CONTROL)
        if label != "plain" and samples[precision, label]
    ]
    confidence = stats.family(len(rows))  # the table's verdicts, judged together
    for precision, label in rows:
        plain, sample = samples[precision, "plain"], samples[precision, label]
        est = stats.difference(sample, plain, noise, confidence)
        if label != CONTROL:  # the control's own claim is what withholds the rest
            est = _held(est, hold)
        words = stats.overhead_words(est, plain.value)
        if label == CONTROL:
            words = f"plain against itself: {words}"
        out.setdefault(precision, {})[label] = Overhead(
            est, confidence, words, share=est.value / plain.value, plain_step_s=plain.value
        )
    return out


def order_effect(records, samples, noise) -> OrderEffect | None:
    """Whether a run's place in its repeat's order changed its speed: the slope of the runs'
    log medians (less their cell's mean) over their position, as a share a position, with its
    interval. None without positions, or with fewer than 3 of them."""
    points, steps = [], []
    for r in records:
        position = r.config.get("position")
        sample = samples.get((precision_of(r), label_of(r)))
        own = sample_of([r], "")
        if position is None or not sample or not own or len(sample.runs) < 2:
            continue
        points.append((position, own.log_value - sample.log_value))
        steps.append(own.fewest_steps)
    x = np.array([p for p, _ in points], dtype=float)
    if len(points) < 3 or np.ptp(x) == 0:
        return None
    y = np.array([v for _, v in points])
    xc = x - x.mean()
    slope = float(np.sum(xc * y) / np.sum(xc**2))
    resid = y - y.mean() - slope * xc
    df = len(points) - 2
    se = math.sqrt(float(np.sum(resid**2)) / df / float(np.sum(xc**2))) if df else None
    half = stats.t_quantile((1 + stats.LEVEL) / 2, df) * se if se is not None else math.inf
    lo, hi = math.expm1(slope - half), math.expm1(slope + half)
    words = f"{math.expm1(slope):+.2%} a position [{lo:+.2%}, {hi:+.2%}]".replace("-", "−")
    if min(steps) < stats.MIN_STEPS:
        verdict = (
            f"{stats.FEW_STEPS} to tell whether order mattered: "
            f"{stats.too_few_steps(min(steps))}"
        )
    elif df < stats.MIN_DF:
        verdict = f"not enough runs to tell whether order mattered ({words})"
    elif lo > 0 or hi < 0:
        verdict = (
            f"order mattered: each later place in a repeat's order ran {words} (the balanced "
            f"order spreads this over every arm alike)"
        )
    else:
        verdict = f"no effect of run order detectable ({words})"
    return OrderEffect(math.expm1(slope), [lo, hi], len(points), verdict)


def notes(group: Group, quote=str) -> list[str]:
    """What the reader must know to weigh the intervals: that one run per arm cannot measure
    the noise between processes; that arms which did the same arithmetic got speed-ups that
    do not overlap, or a framework cost that the control does not show; whether order
    mattered."""
    notes = []
    cells = [c for impls in group.precisions.values() for c in impls.values() if c.step_time_s]
    if cells and all(c.step_time_s.runs == (1,) for c in cells):
        notes.append(
            "One run per cell: nothing here measures the noise between processes, which on "
            "a busy machine is several percent, so no verdict is drawn; --repeats 3 measures "
            "it."
        )
    if group.order:
        notes.append(f"Run order: {group.order.verdict}.")
    for precision in group.precisions:
        same = _same_arithmetic(group, precision)
        for a, b in same:
            x = group.ratios[a][precision].speedup
            y = group.ratios[b][precision].speedup
            if not x.estimate.overlaps(y.estimate):
                notes.append(
                    f"{quote(a)} and {quote(b)} trained bitwise-identical weights at 32-true "
                    f"and {quote(precision)}, yet their {quote(precision)} speed-ups do not "
                    f"overlap ({x.verdict}; "
                    f"{y.verdict}): the machine's noise exceeded these intervals. Measure "
                    f"on an idle machine, with more --repeats."
                )
    notes += _same_weights_costs(group, quote)
    return notes


def _same_weights_costs(group: Group, quote=str) -> list[str]:
    """A note for each arm that trained the same weights as plain at a precision and whose
    step time still differs from plain's there."""
    notes = []
    for precision, per in group.overheads.items():
        cells = group.precisions[precision]
        plain = cells["plain"].weights
        for label, o in per.items():
            if label == CONTROL or not o.estimate.claims(0.0):
                continue
            if not all(plain) or cells[label].weights != plain:
                continue
            if o.estimate.hi < 0:
                notes.append(
                    f"{quote(label)} trained bitwise-identical weights to plain's at "
                    f"{quote(precision)}, yet its steps came out faster ({o.verdict}): the "
                    f"same arithmetic plus a framework's own work cannot take less time, so "
                    f"the machine's noise exceeded this interval."
                )
            else:
                notes.append(
                    f"{quote(label)} trained bitwise-identical weights to plain's at "
                    f"{quote(precision)}: the time it adds is the framework's own work around "
                    f"the same arithmetic, or noise beyond what the control showed; "
                    f"ampcompare bench measures a framework's own cost side by side."
                )
    return notes


def _same_arithmetic(group, precision) -> list[tuple[str, str]]:
    """Pairs of rows whose ok runs trained the same weights (the same weights_sha256 sets) at
    32-true and at this precision, and which both have a speed-up."""
    table, ratios = group.precisions, group.ratios
    labels = [
        label
        for label in table.get(precision, {})
        if label in ratios and precision in ratios[label] and ratios[label][precision].speedup
    ]

    def weights(label, p):
        impl = table[precision][label].impl
        cell = (
            next((c for c in table.get(p, {}).values() if c.impl == impl), None)
            if p == "32-true"
            else table[p][label]
        )
        return tuple(cell.weights) if cell and all(cell.weights) else None

    pairs = []
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            if all(
                weights(a, p) is not None and weights(a, p) == weights(b, p)
                for p in ("32-true", precision)
            ):
                pairs.append((a, b))
    return pairs
