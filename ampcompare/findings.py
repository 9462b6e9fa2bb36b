"""What a set of runs says, as types: the summary that report.py, explain.py and chart.py read,
filled by analysis.py. summary.json is Summary.to_dict(); nothing here computes a figure."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from ampcompare import stats


@dataclass
class Cell:
    """Every run of one arm at one precision and settings."""

    impl: str  # the arm ("plain (control)" for the control)
    runs: int
    ok: int
    opt_level: Optional[str]
    # Each of analysis.METRICS over the ok runs (final_test_acc: over seeds), None where no
    # run has it
    metrics: dict[str, Optional[stats.Spread]]
    seeds: int
    step_time_s: Optional[stats.Estimate]  # geometric mean of the runs' medians, interval
    weights: list[str]  # the ok runs' weights_sha256, each once

    def median(self, metric: str) -> Optional[float]:
        spread = self.metrics.get(metric)
        return spread.median if spread else None

    def to_dict(self) -> dict:
        return {
            "impl": self.impl,
            "runs": self.runs,
            "ok": self.ok,
            "opt_level": self.opt_level,
            **{m: _plain(s) for m, s in self.metrics.items()},
            "seeds": self.seeds,
            "step_time_s": _plain(self.step_time_s),
            "weights": self.weights,
        }


@dataclass
class Judged:
    """A figure with its interval, the confidence it was judged at (a table's rows are judged
    together: stats.family) and the verdict in words."""

    estimate: stats.Estimate
    confidence: float
    verdict: str

    def to_dict(self) -> dict:
        return {
            **self.estimate.to_dict(),
            "confidence": self.confidence,
            "verdict": self.verdict,
        }


@dataclass
class Overhead(Judged):
    """What an arm adds to a step over plain at the same precision."""

    share: float = 0.0  # of plain's step time
    plain_step_s: float = 0.0

    def to_dict(self) -> dict:
        return {**super().to_dict(), "share": self.share, "plain_step_s": self.plain_step_s}


@dataclass
class Ratio:
    """A precision against the same arm's 32-true: the speed-up, memory and accuracy."""

    speedup: Optional[Judged]  # 32-true's step time over this precision's
    activation_bytes: Optional[float]  # this precision's over 32-true's
    peak_memory_bytes: Optional[float]
    peak_beyond_data_bytes: Optional[float]
    accuracy_change: Optional[float]
    seeds: int
    seed_spread: Optional[float]  # the wider of the two cells' accuracy spans over seeds
    # model_state_bytes and each of its parts (record/summary.py), this precision's over
    # 32-true's (None where 32-true's is 0 or unknown: master weights, the scaler)
    state: dict[str, Optional[float]] = field(default_factory=dict)


@dataclass
class OrderEffect:
    """How a run's place in its repeat's order moved its speed, as a share a position."""

    estimate: float
    interval: list[float]
    runs: int
    verdict: str


@dataclass
class Group:
    """The runs of one device, settings and software: a report's section."""

    device: str  # the device, and what sets this group apart from others of its device
    env: dict  # a run's env (an ok run's where there is one)
    config: dict
    settings: dict
    software: dict
    noise: stats.Noise
    precisions: dict[str, dict[str, Cell]]  # precision -> label -> cell
    overheads: dict[str, dict[str, Overhead]] = field(default_factory=dict)
    ratios: dict[str, dict[str, Ratio]] = field(default_factory=dict)  # label -> precision
    control_claims: list[str] = field(default_factory=list)
    order: Optional[OrderEffect] = None
    notes: list[str] = field(default_factory=list)
    explanations: list[str] = field(default_factory=list)

    @property
    def on_cpu(self) -> bool:
        return self.env.get("device") == "cpu"


@dataclass
class ShardedRow:
    """An arm at a precision under FSDP, against the plain loop under DDP, same settings."""

    impl: str
    precision: str
    state: dict[str, Optional[float]]  # model-state part -> FSDP's bytes per rank over DDP's
    same_weights: Optional[bool]  # trained DDP's weights bitwise (None: no weights to weigh)


@dataclass
class Sharded:
    """The FSDP runs of one group against the DDP runs of another that differs only there."""

    device: str  # the FSDP group's name
    against: str  # the DDP group's
    rows: list[ShardedRow]


@dataclass
class Summary:
    schema: int
    devices: list[Group]
    sharded: list[Sharded] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "schema": self.schema,
            "devices": _plain(self.devices),
            "sharded": _plain(self.sharded),
        }


def _plain(value):
    """A value as summary.json holds it: a type's own to_dict where it has one (a Cell
    flattens its metrics, an estimate names its interval), else its fields."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
