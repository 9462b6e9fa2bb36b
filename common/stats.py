"""Timing statistics: a per-step figure with its uncertainty, and verdicts in words.

Every speed figure the tool prints comes from here (report, compare, bench, the GPU check). A
run is summarised by the median of its timed step times; several runs of the same setting by the
mean of their medians. The uncertainty of that figure comes from a two-level bootstrap: the runs
(repeats and seeds) are resampled, then the steps within each run drawn, in blocks of
consecutive steps (a circular block bootstrap), because the noise here comes in bursts that
last many steps and independent draws would call a burst's steps independent evidence. A ratio
or a difference of two figures is taken replicate by replicate, and its 95% interval is the
2.5th to 97.5th percentile of those. Every draw is seeded from the data, so that the same
records always give the same report.

The words follow pyperf and criterion.rs: a difference whose interval holds no change is "no
difference detectable" and says so, with the interval, rather than a bare ratio.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
CHUNK = 1 << 22  # step draws held in memory at once


@dataclass(frozen=True)
class Estimate:
    """A figure, its 95% interval, and how many runs (and steps) each side rests on."""

    value: float
    lo: float
    hi: float
    runs: tuple = ()
    steps: tuple = ()

    def to_dict(self) -> dict:
        return {
            "estimate": self.value,
            "interval": [self.lo, self.hi],
            "runs": list(self.runs),
            "steps": list(self.steps),
        }

    def contains(self, x: float) -> bool:
        return self.lo <= x <= self.hi

    def overlaps(self, other: "Estimate") -> bool:
        return self.lo <= other.hi and other.lo <= self.hi


def median(values) -> Optional[float]:
    """The median of the values that are not None (None when none are)."""
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def spread(values) -> Optional[dict]:
    """The median, least, greatest and count of the values that are not None (None when none
    are): how a report gives a figure over several runs."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": median(values), "min": min(values), "max": max(values), "n": len(values)}


def median_of(cell: dict, metric: str) -> Optional[float]:
    """The median of a report cell's spread of metric (None where the cell has none)."""
    return (cell.get(metric) or {}).get("median")


def quartiles(values: Sequence[float]) -> Optional[tuple[float, float, float]]:
    """(first quartile, median, third quartile), or None without values."""
    if len(values) == 0:
        return None
    q1, med, q3 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return float(q1), float(med), float(q3)


class Sample:
    """The timed step times of every run of one setting (one list per run), and the bootstrap
    replicates of its figure (the mean over runs of each run's median step)."""

    def __init__(self, runs: Sequence[Sequence[float]], name: str = ""):
        self.runs = [np.asarray(r, dtype=float) for r in runs if len(r)]
        self.name, self._replicates = name, None

    def __bool__(self) -> bool:
        return bool(self.runs)

    @property
    def value(self) -> float:
        return float(np.mean([np.median(r) for r in self.runs]))

    @property
    def steps(self) -> int:
        return sum(len(r) for r in self.runs)

    def replicates(self, picks: Optional[np.ndarray] = None) -> np.ndarray:
        """The figure under RESAMPLES bootstrap draws; `picks` (RESAMPLES x runs) fixes which
        runs each draw takes, for a comparison of runs measured side by side."""
        rng = _rng(self.runs, self.name)
        if picks is not None:
            return _replicates(self.runs, rng, picks)
        if self._replicates is None:
            self._replicates = _replicates(self.runs, rng, _picks(len(self.runs), rng))
        return self._replicates

    def estimate(self) -> Estimate:
        lo, hi = _interval(self.replicates())
        return Estimate(self.value, lo, hi, (len(self.runs),), (self.steps,))


def ratio(a: Sample, b: Sample, paired: bool = False) -> Estimate:
    """a's figure over b's (e.g. 32-true's step time over a mixed precision's: the speed-up).
    paired: run i of a was measured beside run i of b (a round of the bench); both draws take
    the same runs, so that what a round did to both cancels."""
    ra, rb = _both(a, b, paired)
    lo, hi = _interval(ra / rb)
    return Estimate(a.value / b.value, lo, hi, (len(a.runs), len(b.runs)), (a.steps, b.steps))


def difference(a: Sample, b: Sample, paired: bool = False) -> Estimate:
    """a's figure less b's (e.g. a framework's step time less plain's: its cost per step)."""
    ra, rb = _both(a, b, paired)
    lo, hi = _interval(ra - rb)
    return Estimate(a.value - b.value, lo, hi, (len(a.runs), len(b.runs)), (a.steps, b.steps))


def _both(a: Sample, b: Sample, paired: bool) -> tuple[np.ndarray, np.ndarray]:
    if not paired:
        return a.replicates(), b.replicates()
    if len(a.runs) != len(b.runs):
        raise ValueError(f"paired samples need as many runs: {len(a.runs)} and {len(b.runs)}")
    picks = _picks(len(a.runs), _rng(a.runs + b.runs, a.name + "|" + b.name))
    return a.replicates(picks), b.replicates(picks)


def block_length(n: int) -> int:
    """Consecutive steps drawn together: n^(1/3), the usual order for a block bootstrap."""
    return max(1, int(round(n ** (1 / 3))))


def _rng(runs, name: str) -> np.random.Generator:
    h = hashlib.sha256(name.encode())
    for r in runs:
        h.update(r.tobytes())
    return np.random.default_rng(int.from_bytes(h.digest()[:8], "little"))


def _picks(runs: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, runs, size=(RESAMPLES, runs))


def _replicates(runs, rng: np.random.Generator, picks: np.ndarray) -> np.ndarray:
    """The figure under each draw: the runs that `picks` names, each with its steps drawn
    afresh in blocks."""
    medians = np.empty(picks.shape)
    for r, steps in enumerate(runs):
        where = np.nonzero(picks == r)
        medians[where] = _block_medians(steps, len(where[0]), rng)
    return medians.mean(axis=1)


def _block_medians(steps: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """The medians of `count` circular block resamples of one run's steps."""
    n = len(steps)
    length = block_length(n)
    blocks = -(-n // length)
    offsets = np.arange(length)
    out = np.empty(count)
    per_chunk = max(1, CHUNK // (blocks * length))
    for start in range(0, count, per_chunk):
        m = min(per_chunk, count - start)
        first = rng.integers(0, n, size=(m, blocks))
        index = ((first[:, :, None] + offsets) % n).reshape(m, -1)[:, :n]
        out[start : start + m] = np.median(steps[index], axis=1)
    return out


def _interval(replicates: np.ndarray) -> tuple[float, float]:
    tail = (1 - LEVEL) / 2 * 100
    lo, hi = np.percentile(replicates, [tail, 100 - tail])
    return float(lo), float(hi)


# --- words ---------------------------------------------------------------------------------


def _digits(*values: float) -> int:
    """Decimals enough (2 to 4) to tell the values apart from each other and from 1."""
    points = sorted(set((*values, 1.0)))
    gap = min((b - a for a, b in zip(points, points[1:])), default=1.0)
    return min(4, max(2, math.ceil(-math.log10(gap) - 1e-9) if gap > 0 else 4))


def span(lo: float, hi: float, digits: int = 2, unit: str = "") -> str:
    return f"[{lo:.{digits}f}–{hi:.{digits}f}{unit}]"


def speed_words(est: Estimate, faster: str = "faster", slower: str = "slower") -> str:
    """A ratio of times where above 1 means `faster` (the reference's time over this one's):
    "1.31× faster [1.25–1.38]", "no difference detectable [0.97–1.04]", "1.25× slower"."""
    if est.lo > 1:
        d = _digits(est.value, est.lo, est.hi)
        return f"{est.value:.{d}f}× {faster} {span(est.lo, est.hi, d)}"
    if est.hi < 1:
        inv = (1 / est.value, 1 / est.hi, 1 / est.lo)
        d = _digits(*inv)
        return f"{inv[0]:.{d}f}× {slower} {span(inv[1], inv[2], d)}"
    d = _digits(est.lo, est.hi)
    return f"no difference detectable {span(est.lo, est.hi, d)}"


def time_ratio_words(est: Estimate) -> str:
    """A ratio of this arm's time over the reference's (above 1: slower), its interval as it
    is: "1.04× slower [1.02–1.06]", "no difference detectable [0.99–1.03]"; one below 1 is
    said as a speed-up, "1.25× faster [1.20–1.31]"."""
    if est.hi < 1:
        return speed_words(Estimate(1 / est.value, 1 / est.hi, 1 / est.lo, est.runs, est.steps))
    if est.lo > 1:
        d = _digits(est.value, est.lo, est.hi)
        return f"{est.value:.{d}f}× slower {span(est.lo, est.hi, d)}"
    d = _digits(est.lo, est.hi)
    return f"no difference detectable {span(est.lo, est.hi, d)}"


def share(a: Sample, b: Sample, base: Sample, paired: bool = False) -> Estimate:
    """(a − b) / base: a difference as a share of another figure (a framework's cost per step
    as a share of a bigger model's step), every figure's uncertainty carried through."""
    ra, rb = _both(a, b, paired)
    lo, hi = _interval((ra - rb) / base.replicates())
    return Estimate(
        (a.value - b.value) / base.value, lo, hi, (len(a.runs), len(b.runs)), (a.steps, b.steps)
    )


def overhead_words(est: Estimate, base_s: float, base_name: str = "plain") -> str:
    """A difference of step times (seconds) as time a step and as a share of the base's step:
    "+812 µs a step [+690, +930], 0.33% of plain's 246 ms step"."""
    scale, unit = (1e6, "µs") if max(abs(est.lo), abs(est.hi)) < 1e-3 else (1e3, "ms")
    digits = 0 if unit == "µs" else 1 if max(abs(est.lo), abs(est.hi)) * scale >= 10 else 2
    value = f"{est.value * scale:+.{digits}f} {unit}".replace("-", "−")
    where = signed_span(est.lo * scale, est.hi * scale, digits)
    if est.lo > 0:
        return (
            f"{value} a step {where}, {est.value / base_s:.2%} of {base_name}'s "
            f"{duration(base_s)} step"
        )
    if est.hi < 0:
        return (
            f"{value} a step {where}: {base_name}'s steps took longer here ({duration(base_s)})"
        )
    return (
        f"no difference detectable {where} {unit} a step, against {base_name}'s "
        f"{duration(base_s)}"
    )


def against(est: Estimate, target: float, at_most: bool) -> str:
    """Whether the interval lies on the good side of a target, the bad side, or both."""
    sign = "≤" if at_most else "≥"
    good = (lambda v: v <= target) if at_most else (lambda v: v >= target)
    if good(est.lo) and good(est.hi):
        return f"meets {sign} {target}"
    if not good(est.lo) and not good(est.hi):
        return f"misses {sign} {target}"
    return f"cannot tell: the interval holds both sides of {target}"


def signed_span(lo: float, hi: float, digits: int) -> str:
    return f"[{lo:+.{digits}f}, {hi:+.{digits}f}]".replace("-", "−")


def duration_with_interval(value: float, lo: float, hi: float) -> str:
    """A time and its interval in one unit: "246 ms [241–252]"."""
    scale, unit = (1, "s") if value >= 1 else (1e3, "ms") if value >= 1e-3 else (1e6, "µs")
    digits = 0 if value * scale >= 100 else 1 if value * scale >= 10 else 2
    return f"{value * scale:.{digits}f} {unit} {span(lo * scale, hi * scale, digits)}"


def duration(seconds: float) -> str:
    """A step time in the unit that suits it: 1.31 ms, 246 ms, 2.10 s."""
    if seconds >= 1:
        return f"{seconds:.2f} s"
    ms = seconds * 1e3
    return f"{ms:.3g} ms" if ms >= 1 else f"{seconds * 1e6:.0f} µs"
