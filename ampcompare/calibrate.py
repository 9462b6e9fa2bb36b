"""calibrate: how often the report's verdicts claim a difference that is not there, and how
often they find one that is, measured on this machine's own runs.

Given six or more runs of each cell (one arm at one precision: `compare --impls plain
--repeats 8`), each split of a cell's runs into two disjoint groups of k is treated as two
arms that the report compares, with the noise between processes pooled over every cell's
two groups, as a report pools it over a comparison. Every run is of the same arm, so a split
whose verdict claims a difference is a false one: their share is the false-difference rate at
k runs a cell. With a slowdown (say 0.05), one group's step times are made that much longer
and the share of splits that find it is the method's power at that size of effect.

The splits of one set of runs are not independent: a rate measured on 8 runs carries the
luck of those 8. docs/benchmark.md gives the figures of the recorded runs that
tests/test_calibration.py keeps in check.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ampcompare import stats
from common.errors import UsageError

MIN_RUNS = 6  # fewer leave groups of 2 at most, and too few splits to say anything


@dataclass(frozen=True)
class Rate:
    """What the splits at k runs a group came to."""

    k: int
    splits: int
    trials: int  # splits times cells
    claimed: int  # trials whose verdict claimed a difference
    undecided: int  # trials with no verdict (too few degrees of freedom or steps)
    df: int  # the degrees of freedom each verdict rested on

    @property
    def share(self) -> float:
        return self.claimed / self.trials if self.trials else math.nan

    def interval(self) -> tuple[float, float]:
        """Wilson's 95% interval on the share, as if the trials were independent (they are
        not: it is the least the uncertainty can be)."""
        n, p = self.trials, self.share
        if not n:
            return math.nan, math.nan
        z = stats.normal_quantile((1 + stats.LEVEL) / 2)
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)


def splits(n: int, k: int, most: Optional[int], seed: int = 0) -> list[tuple[tuple, tuple]]:
    """Unordered pairs of disjoint k-subsets of range(n): all of them, or `most` drawn at
    random (seeded) when there are more."""
    total = math.comb(n, k) * math.comb(n - k, k) // 2
    if most is None or total <= most:
        out = []
        for a in itertools.combinations(range(n), k):
            rest = [i for i in range(n) if i not in a]
            for b in itertools.combinations(rest, k):
                if a < b:
                    out.append((a, b))
        return out
    rng, seen, out = np.random.default_rng(seed), set(), []
    while len(out) < most:
        order = rng.permutation(n)
        a, b = tuple(sorted(order[:k].tolist())), tuple(sorted(order[k : 2 * k].tolist()))
        key = (min(a, b), max(a, b))
        if key not in seen:
            seen.add(key)
            out.append(key)
    return out


def rate(
    cells: Sequence[Sequence[stats.Sample]],
    k: int,
    slowdown: float = 0.0,
    most: Optional[int] = None,
    seed: int = 0,
    confidence: float = stats.LEVEL,
) -> Rate:
    """The share of splits into groups of k whose verdict claims a difference. `cells`: for
    each cell, its runs as one-run samples in the order they ran; each split takes the same
    places in every cell (runs of one repeat ran close together in time, in every cell), and
    pools the noise over every cell's two groups. With `slowdown`, the second group's steps
    are that much longer. `confidence`: each verdict's, 95% or a table's row's."""
    n = min(len(c) for c in cells)
    claimed = undecided = trials = df = 0
    chosen = splits(n, k, most, seed)
    for a, b in chosen:
        groups = [
            (
                stats.Sample.join([cell[i] for i in a]),
                stats.Sample.join([cell[i] for i in b], factor=1 + slowdown),
            )
            for cell in cells
        ]
        noise = stats.Noise.pooled([g for pair in groups for g in pair])
        for first, second in groups:
            est = stats.ratio(second, first, noise, confidence)
            df = est.df
            trials += 1
            undecided += est.short is not None
            claimed += est.claims(1.0)
    return Rate(k, len(chosen), trials, claimed, undecided, df)


def table_rate(
    cells: Sequence[Sequence[stats.Sample]],
    k: int,
    arms: int,
    draws: int,
    slowdown: float = 0.0,
    seed: int = 0,
) -> tuple[float, float]:
    """A report's table of framework costs, made from one arm's runs: in each cell, `arms` + 1
    disjoint groups of k drawn at random (the first is "plain"), every other group compared
    with it, the noise pooled over them all, each row at the table's confidence
    (stats.family). Returns (the share of tables with any false claim, the share in which a
    first arm made `slowdown` slower was found)."""
    rng = np.random.default_rng(seed)
    rows = len(cells) * arms
    false = found = 0
    for _ in range(draws):
        groups = []
        for cell in cells:
            order = rng.permutation(len(cell))
            groups.append(
                [
                    stats.Sample.join(
                        [cell[i] for i in order[j * k : (j + 1) * k]],
                        factor=1 + slowdown if j == 1 else 1.0,
                    )
                    for j in range(arms + 1)
                ]
            )
        noise = stats.Noise.pooled([g for row in groups for g in row])
        claims = [
            [
                stats.difference(g, row[0], noise, stats.family(rows)).claims(0.0)
                for g in row[1:]
            ]
            for row in groups
        ]
        found += claims[0][0]
        false += any(c for r in claims for c in (r[1:] if slowdown else r))
    return false / draws, found / draws


def cells_of(records, steps: Optional[int] = None) -> dict[str, list[stats.Sample]]:
    """The ok runs of each cell (precision and arm) of one machine and settings, each as a
    one-run sample, in the order they ran (repeat, then place in the order); `steps`: only
    each run's first so many timed steps. The plain loop and its control are one arm here.
    Raises UsageError for records of several machines or settings."""
    from ampcompare import analysis

    groups = analysis.groups_of([r for r in records if r.status == "ok"])
    if len(groups) > 1:
        raise UsageError(
            f"calibrate takes the runs of one machine and settings; these hold "
            f"{len(groups)} (report shows how they differ): give their folders apart"
        )
    out = {}
    for _, _, runs in groups:
        for r in sorted(runs, key=_ran):
            label = analysis.label_of(r).replace(analysis.CONTROL, "plain")
            times = analysis.sample_of([r], r.run_id).runs
            if times:
                run = times[0][:steps] if steps else times[0]
                name = f"{label} {analysis.precision_of(r)}"
                out.setdefault(name, []).append(stats.Sample([run], r.run_id))
    return out


def _ran(record) -> tuple:
    """When a run ran within its comparison: its repeat, then its place in that repeat."""
    return (record.repeat or 0, record.config.get("position") or 0)


def run(records, slowdown: float, most: int, steps: Optional[int]) -> str:
    """The calibration of these records, as a table; UsageError when no cell has MIN_RUNS."""
    cells = cells_of(records, steps)
    kept = {name: runs for name, runs in cells.items() if len(runs) >= MIN_RUNS}
    if not kept:
        most_runs = max((len(r) for r in cells.values()), default=0)
        raise UsageError(
            f"calibrate needs ≥ {MIN_RUNS} ok runs of one arm at one precision (e.g. "
            f"compare --impls plain --repeats 8); the most here is {most_runs}"
        )
    n = min(len(r) for r in kept.values())
    rates = {
        k: (
            rate(list(kept.values()), k, 0.0, most),
            rate(list(kept.values()), k, slowdown, most) if slowdown else None,
        )
        for k in range(2, n // 2 + 1)
    }
    return table(kept, rates, slowdown)


def table(cells: dict, rates: dict, slowdown: float = 0.0) -> str:
    """rates: {k: (null Rate, slowdown Rate or None)}."""
    lines = ["Each cell's runs split into two groups of k, every split compared as two arms:"]
    lines += [f"  {name}: {len(runs)} runs" for name, runs in cells.items()]
    lines += [
        "false differences: the share of comparisons that claimed one (every run is of the "
        "same arm); at a 95% level about 5% is the method's promise.",
    ]
    if slowdown:
        lines.append(
            f"slowdown found: the share that found one group made {slowdown * 100:.3g}% slower."
        )
    lines.append("")
    head = f"{'k':>3} {'splits':>7} {'df':>4}  {'false differences [95%]':<32}"
    slowed = next((s for _, s in rates.values() if s), None)
    if slowed:
        head += f"  {slowdown * 100:.3g}% slowdown found [95%]"
    lines.append(head)
    for k, (null, slow) in rates.items():
        line = f"{k:>3} {null.splits:>7} {null.df:>4}  {_share(null):<32}"
        if slow:
            line += f"  {_share(slow)}"
        lines.append(line)
    return "\n".join(lines)


def _share(r: Rate) -> str:
    if r.trials and r.undecided == r.trials:
        return f"no verdict drawn in {r.trials} comparisons"
    lo, hi = r.interval()
    text = f"{r.share:.1%} [{lo:.1%}–{hi:.1%}] of {r.trials}"
    return text + (f" ({r.undecided} no verdict)" if r.undecided else "")
