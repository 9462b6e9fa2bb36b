"""Timing statistics: a per-step figure with its uncertainty, and verdicts in words.

Every speed figure the tool prints comes from here (report, compare, bench, calibrate, the GPU
check). A run is summarised by the median of its timed steps, taken on a log scale; several runs
of the same setting (a cell) by the mean of those logs, i.e. the geometric mean of the runs'
medians. Each run's figure is the cell's value plus the noise of its process, and on a shared
machine that noise is several percent from one process to the next, more than a run's own steps
can show. So the uncertainty of a figure has two parts:

- between processes: the variance of the runs' log medians about their cell's mean, pooled over
  every cell of the comparison (every arm ran on the same machine in the same session), with its
  degrees of freedom; intervals use Student's t with those;
- within a run: a circular block bootstrap of each run's median step (blocks, because the noise
  comes in bursts that last many steps).

An interval is the wider of the two. A ratio or difference of two cells is taken on the log
scale, so every interval is symmetric there and holds its own estimate. Below MIN_DF degrees of
freedom, or MIN_STEPS timed steps in a run, no verdict is given: the words say "not enough runs
(or steps) to tell" and what would be enough. docs/benchmark.md ("How sure is a verdict") gives
the measured false-difference rate and power of this method, and tests/test_calibration.py keeps
them on recorded runs.

The words follow pyperf and criterion.rs: a difference whose interval holds no change is "no
difference detectable" and says so, with the interval, rather than a bare ratio.
"""

from __future__ import annotations

import functools
import hashlib
import math
import statistics
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np

from record.summary import median  # a run's own figures use it too

RESAMPLES = 2000
LEVEL = 0.95
CHUNK = 1 << 22  # step draws held in memory at once
# The least evidence a verdict rests on, chosen from the calibration (docs/benchmark.md): the
# degrees of freedom of the pooled between-process variance, and the timed steps in every run.
MIN_DF = 2
MIN_STEPS = 6


@dataclass(frozen=True)
class Estimate:
    """A figure, its 95% interval, how many runs (and steps) each side rests on, the degrees of
    freedom of its between-process part, and why no verdict may be drawn from it (None: one
    may)."""

    value: float
    lo: float
    hi: float
    runs: tuple = ()
    steps: tuple = ()
    df: Optional[int] = None
    short: Optional[str] = None

    def to_dict(self) -> dict:
        return {
            "estimate": self.value,
            "interval": [self.lo, self.hi],
            "runs": list(self.runs),
            "steps": list(self.steps),
            "df": self.df,
            "no_verdict": self.short,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Estimate":
        return cls(
            d["estimate"],
            *d["interval"],
            tuple(d.get("runs") or ()),
            tuple(d.get("steps") or ()),
            d.get("df"),
            d.get("no_verdict"),
        )

    def contains(self, x: float) -> bool:
        return self.lo <= x <= self.hi

    def overlaps(self, other: "Estimate") -> bool:
        return self.lo <= other.hi and other.lo <= self.hi

    def claims(self, null: float) -> bool:
        """Whether it claims a difference from `null`: a verdict may be drawn, and its interval
        leaves `null` out."""
        return self.short is None and not self.contains(null)


@dataclass
class Spread:
    """How a report gives a figure over several runs: median, least, greatest and count."""

    median: float
    min: float
    max: float
    n: int


def spread(values) -> Optional[Spread]:
    """The Spread of the values that are not None (None when none are)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return Spread(median(values), min(values), max(values), len(values))


LONGEST_STEP = 1e6  # seconds: eleven days; a step time beyond it is no measurement
SHORTEST_STEP = 1e-9  # seconds: a nanosecond; no training step is shorter


def usable(steps) -> bool:
    """Whether every step time is a number from SHORTEST_STEP to under LONGEST_STEP (a record
    that holds any other is not evidence: report skips it, and names it)."""
    return all(
        isinstance(t, (int, float))
        and not isinstance(t, bool)
        and SHORTEST_STEP <= t < LONGEST_STEP
        for t in steps
    )


# --- quantiles -----------------------------------------------------------------------------


def normal_quantile(p: float) -> float:
    return statistics.NormalDist().inv_cdf(p)


@functools.lru_cache(maxsize=None)
def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with df degrees of freedom (p > 0.5), by bisection on its
    distribution function."""
    if df <= 0:
        raise ValueError(f"t has no quantile at {df} degrees of freedom")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12 * hi:
            break
    return (lo + hi) / 2


def t_cdf(x: float, df: float) -> float:
    """P(T <= x) for Student's t with df degrees of freedom."""
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + x * x))
    return 1 - tail if x >= 0 else tail


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1 - _betainc(b, a, 1 - x)
    front = math.exp(
        math.lgamma(a + b)
        - math.lgamma(a)
        - math.lgamma(b)
        + a * math.log(x)
        + b * math.log1p(-x)
    )
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-14:
            break
    return front * h / a


# --- samples and the noise between processes -----------------------------------------------


class Sample:
    """The timed step times of every run of one setting (one list per run): each run's log
    median, the cell's figure (their geometric mean) and the within-run part of its
    uncertainty."""

    def __init__(self, runs: Sequence[Sequence[float]], name: str = ""):
        self.runs = [np.asarray(r, dtype=float) for r in runs if len(r)]
        self.name, self._within = name, None

    def __bool__(self) -> bool:
        return bool(self.runs)

    @property
    def logs(self) -> np.ndarray:
        return np.log([np.median(r) for r in self.runs])

    @property
    def log_value(self) -> float:
        return float(np.mean(self.logs))

    @property
    def value(self) -> float:
        return math.exp(self.log_value)

    @property
    def steps(self) -> int:
        return sum(len(r) for r in self.runs)

    @property
    def fewest_steps(self) -> int:
        return min(len(r) for r in self.runs)

    def run_within(self) -> list[float]:
        """Each run's variance of its log median, by a circular block bootstrap of its
        steps, seeded from them."""
        if self._within is None:
            self._within = [
                float(np.var(np.log(_block_medians(r, RESAMPLES, _rng([r], self.name)))))
                for r in self.runs
            ]
        return self._within

    def within(self) -> float:
        """The variance of the cell's mean log median that its runs' own steps show."""
        return sum(self.run_within()) / len(self.runs) ** 2

    @classmethod
    def join(cls, parts: Sequence["Sample"], name: str = "", factor: float = 1.0) -> "Sample":
        """One sample of the runs of several (their within-run parts kept, not drawn again),
        every step time multiplied by `factor`: a calibration's groups and its injected
        slowdown (a factor leaves a run's spread on the log scale as it was)."""
        out = cls([r * factor for p in parts for r in p.runs], name)
        out._within = [w for p in parts for w in p.run_within()]
        return out


@dataclass(frozen=True)
class Noise:
    """The variance between processes of a run's log median step, pooled over the cells of
    one comparison, with its degrees of freedom (the runs less the cells that had any)."""

    variance: Optional[float]
    df: int
    cells: int

    @classmethod
    def pooled(cls, samples) -> "Noise":
        samples = [s for s in samples if s]
        squares = sum(float(np.sum((s.logs - s.log_value) ** 2)) for s in samples)
        df = sum(len(s.runs) - 1 for s in samples)
        return cls(squares / df if df else None, df, len(samples))


NO_NOISE = Noise(None, 0, 1)


def _noise_for(samples: Sequence[Sample], noise: Noise) -> Noise:
    """The noise that a figure of these samples is judged against: the larger of the variance
    pooled over the comparison and the one pooled over these samples' own runs, at the
    degrees of freedom of their own runs. Cells differ in how noisy they are (bf16 steps here
    moved between two speeds from one process to the next, fp32 steps less), so a pooled
    variance alone made a noisy pair claim too often; the calibration (docs/benchmark.md)
    measured both."""
    own = Noise.pooled(samples)
    if own.variance is None:  # no run of these repeated: the comparison's is all there is
        return noise
    variance = max(own.variance, noise.variance or 0.0)
    return Noise(variance, own.df, noise.cells)


FEW_STEPS = "not enough steps"


def too_few_steps(fewest: int) -> str:
    return (
        f"a run has {fewest} timed step{'s' if fewest != 1 else ''}, need ≥ {MIN_STEPS} "
        f"(more --epochs, or more steps an epoch)"
    )


def _short(samples: Sequence[Sample]) -> Optional[str]:
    """Why these samples cannot carry a verdict, or None: too few timed steps in a run, or
    too few runs of their own to set their noise against (the comparison's other cells
    widen their interval, but were never shown to make a verdict on single runs sound)."""
    fewest = min(s.fewest_steps for s in samples)
    if fewest < MIN_STEPS:
        return f"{FEW_STEPS} to tell: {too_few_steps(fewest)}"
    if sum(len(s.runs) - 1 for s in samples) < MIN_DF:  # the calibration's least
        runs = min(len(s.runs) for s in samples)
        need = 1 + math.ceil(MIN_DF / len(samples))
        return (
            f"not enough runs to tell: {runs} run{'s' if runs != 1 else ''} a cell, need "
            f"≥ {need} (--repeats {need})"
        )
    return None


def _half_width(
    se_between: Optional[float], df: int, se_within: float, confidence: float = LEVEL
) -> float:
    """The half-width on the log scale: t over the between-process part, or the normal
    quantile over the within-run part, whichever is wider."""
    q = (1 + confidence) / 2
    within = normal_quantile(q) * se_within
    if se_between is None or df < 1:
        return within
    return max(t_quantile(q, df) * se_between, within)


def _between_se(noise: Noise, *sizes: int) -> Optional[float]:
    if noise.variance is None or noise.df < 1:
        return None
    return math.sqrt(noise.variance * sum(1 / n for n in sizes))


def level(a: Sample, noise: Noise = NO_NOISE) -> Estimate:
    """A cell's step time (the geometric mean of its runs' medians) with its interval."""
    noise = _noise_for([a], noise)
    half = _half_width(_between_se(noise, len(a.runs)), noise.df, math.sqrt(a.within()))
    m = a.log_value
    return Estimate(
        math.exp(m),
        math.exp(m - half),
        math.exp(m + half),
        (len(a.runs),),
        (a.steps,),
        noise.df,
        _short([a]),
    )


def log_ratio(
    a: Sample, b: Sample, noise: Noise, confidence: float = LEVEL
) -> tuple[float, float, Noise]:
    """log(a / b), the half-width of its interval, and the noise it was judged against."""
    noise = _noise_for([a, b], noise)
    se_b = _between_se(noise, len(a.runs), len(b.runs))
    half = _half_width(se_b, noise.df, math.sqrt(a.within() + b.within()), confidence)
    return a.log_value - b.log_value, half, noise


def family(rows: int) -> float:
    """The confidence of each of `rows` intervals that together claim a false difference at
    most 1 − LEVEL of the time (Bonferroni): a table of verdicts is judged as a whole."""
    return 1 - (1 - LEVEL) / max(1, rows)


def ratio(a: Sample, b: Sample, noise: Noise = NO_NOISE, confidence: float = LEVEL) -> Estimate:
    """a's figure over b's (e.g. 32-true's step time over a mixed precision's: the
    speed-up), its interval at `confidence` (95%, or a table's share: family())."""
    d, half, noise = log_ratio(a, b, noise, confidence)
    return Estimate(
        math.exp(d),
        math.exp(d - half),
        math.exp(d + half),
        (len(a.runs), len(b.runs)),
        (a.steps, b.steps),
        noise.df,
        _short([a, b]),
    )


def difference(
    a: Sample, b: Sample, noise: Noise = NO_NOISE, confidence: float = LEVEL
) -> Estimate:
    """a's figure less b's (e.g. a framework's step time less plain's: its cost per step):
    the ratio's interval, in b's time."""
    r, base = ratio(a, b, noise, confidence), b.value
    return replace(r, value=a.value - base, lo=base * (r.lo - 1), hi=base * (r.hi - 1))


def block_length(n: int) -> int:
    """Consecutive steps drawn together: n^(1/3), the usual order for a block bootstrap."""
    return max(1, int(round(n ** (1 / 3))))


def _rng(runs, name: str) -> np.random.Generator:
    h = hashlib.sha256(name.encode())
    for r in runs:
        h.update(np.asarray(r, dtype=float).tobytes())
    return np.random.default_rng(int.from_bytes(h.digest()[:8], "little"))


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


# --- figures measured in several processes (the bench) -------------------------------------


def across(values: Sequence[float], within: Sequence[float] = ()) -> tuple[float, float, int]:
    """(mean, half-width, df) of a figure measured once in each of several processes (values
    on a log scale, or differences), where `within` holds each value's own variance: Student's
    t over the processes' spread, or the within part where that is wider."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    se_w = math.sqrt(sum(within)) / n if len(within) else 0.0
    se_b = float(np.std(x, ddof=1)) / math.sqrt(n) if n > 1 else None
    return float(x.mean()), _half_width(se_b, n - 1, se_w), n - 1


def paired_logs(a: Sample, b: Sample) -> tuple[float, float]:
    """Runs of a and b measured side by side in pairs (a bench's rounds): the mean over pairs
    of log(a's median / b's median), and its variance from the pairs' spread."""
    if len(a.runs) != len(b.runs):
        raise ValueError(f"paired samples need as many runs: {len(a.runs)} and {len(b.runs)}")
    d = a.logs - b.logs
    return float(d.mean()), float(np.var(d, ddof=1)) / len(d) if len(d) > 1 else 0.0


# --- words ---------------------------------------------------------------------------------


def _digits(*values: float) -> int:
    """Decimals enough (2 to 4) to tell the values apart from each other and from 1."""
    points = sorted({float(f"{v:.6g}") for v in (*values, 1.0)})
    gap = min((b - a for a, b in zip(points, points[1:])), default=1.0)
    return min(4, max(2, math.ceil(-math.log10(gap) - 1e-9) if gap > 0 else 4))


def span(lo: float, hi: float, digits: int = 2, unit: str = "") -> str:
    return f"[{lo:.{digits}f}–{hi:.{digits}f}{unit}]"


def _undecided(est: Estimate, figure: str) -> str:
    return f"{est.short}; measured {figure}"


def speed_words(est: Estimate, faster: str = "faster", slower: str = "slower") -> str:
    """A ratio of times where above 1 means `faster` (the reference's time over this one's):
    "1.31× faster [1.25–1.38]", "no difference detectable [0.97–1.04]", "1.25× slower"."""
    if est.short:
        d = _digits(est.value, est.lo, est.hi)
        return _undecided(est, f"{est.value:.{d}f}× {span(est.lo, est.hi, d)}")
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
    if est.short:
        d = _digits(est.value, est.lo, est.hi)
        return _undecided(est, f"{est.value:.{d}f}× the time {span(est.lo, est.hi, d)}")
    if est.hi < 1:
        return speed_words(Estimate(1 / est.value, 1 / est.hi, 1 / est.lo, est.runs, est.steps))
    if est.lo > 1:
        d = _digits(est.value, est.lo, est.hi)
        return f"{est.value:.{d}f}× slower {span(est.lo, est.hi, d)}"
    d = _digits(est.lo, est.hi)
    return f"no difference detectable {span(est.lo, est.hi, d)}"


def overhead_words(est: Estimate, base_s: float, base_name: str = "plain") -> str:
    """A difference of step times (seconds) as time a step and as a share of the base's step:
    "+812 µs a step [+690, +930], 0.33% of plain's 246 ms step"."""
    scale, unit = (1e6, "µs") if max(abs(est.lo), abs(est.hi)) < 1e-3 else (1e3, "ms")
    digits = 0 if unit == "µs" else 1 if max(abs(est.lo), abs(est.hi)) * scale >= 10 else 2
    value = f"{est.value * scale:+.{digits}f} {unit}".replace("-", "−")
    where = signed_span(est.lo * scale, est.hi * scale, digits)
    if est.short:
        return _undecided(
            est, f"{value} a step {where}, against {base_name}'s {duration(base_s)}"
        )
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


def target_words(est: Estimate, target: float, at_most: bool) -> str:
    """Whether the interval lies on the good side of a target, the bad side, or both."""
    sign = "≤" if at_most else "≥"
    good = (lambda v: v <= target) if at_most else (lambda v: v >= target)
    if est.short:
        return f"cannot tell against {sign} {target}: {est.short}"
    if good(est.lo) and good(est.hi):
        return f"meets {sign} {target}"
    if not good(est.lo) and not good(est.hi):
        return f"misses {sign} {target}"
    return f"cannot tell: the interval holds both sides of {target}"


def signed_span(lo: float, hi: float, digits: int) -> str:
    return f"[{lo:+.{digits}f}, {hi:+.{digits}f}]".replace("-", "−")


def duration_with_interval(est: Estimate) -> str:
    """A time and its interval in one unit: "246 ms [241–252]"; with fewer than MIN_STEPS
    timed steps in a run, "246 ms [too few steps]": the interval of a handful of steps (of
    one, zero wide) is no 95% interval."""
    value = est.value
    scale, unit = (1, "s") if value >= 1 else (1e3, "ms") if value >= 1e-3 else (1e6, "µs")
    digits = 0 if value * scale >= 100 else 1 if value * scale >= 10 else 2
    if est.short and est.short.startswith(FEW_STEPS):
        return f"{value * scale:.{digits}f} {unit} [too few steps]"
    return f"{value * scale:.{digits}f} {unit} {span(est.lo * scale, est.hi * scale, digits)}"


def duration(seconds: float) -> str:
    """A step time in the unit that suits it: 1.31 ms, 246 ms, 2.10 s."""
    if seconds >= 1:
        return f"{seconds:.2f} s"
    ms = seconds * 1e3
    return f"{ms:.3g} ms" if ms >= 1 else f"{seconds * 1e6:.0f} µs"
