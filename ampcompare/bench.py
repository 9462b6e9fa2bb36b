"""`make bench`: what each framework costs per step, and the ratios around it, each with its 95%
interval and a verdict in words, measured in several fresh processes and pooled over them.

    .venv/bin/ampcompare bench                           # CPU, about 4 minutes
    .venv/bin/ampcompare bench --processes 5 --accelerator cuda

How it measures. Each of --processes fresh processes (ampcompare/bench_process.py) runs every
measurement with its arms as threads that take turns epoch by epoch, so that within a process a
round's arms ran within seconds of each other and a ratio taken round by round cancels what
the machine did to both. That alone is not enough: one process's figure moves from the next
one's by more than its rounds can show (three bench runs of one process each put Lightning's
cost at +372, +887 and +612 µs, intervals apart). So each figure is taken once per process, and
its interval is Student's t over the processes' spread, with their count less one degrees of
freedom (ampcompare/stats.py `across`), or the rounds' own spread where that is wider. A control
arm, the plain loop a second time, is measured by the same procedure: plain against plain must
show no difference, and its interval is the noise floor of every other figure.

- lightning_cost_per_step, fabric_cost_per_step, accelerate_cost_per_step: the step time each
  framework adds to the plain loop, with the `linear` model (next to no compute, so that the
  framework dominates) and one thread. control_cost_per_step and control_ratio: plain against
  plain, the same way. Target for Lightning's: an interval that excludes 0, half as wide as the
  estimate at most (±25%).
- lightning_cost_share_of_small_step, ...: that cost as a share of the small CNN's 32-true
  step (batch 256), where a step is mostly arithmetic: what a user of a real model pays.
- bf16_over_fp32: step time of bf16-mixed over 32-true (plain loop, small CNN), beside
  control_over_fp32 (32-true against itself), and the activation memory ratio.
- data_wait_fraction: the share of a training step spent waiting for data, with the common
  pipeline (plain loop, small CNN). Target: at most 0.02.
- loader_over_torchvision: images/s of the common pipeline over a torchvision DataLoader
  (RandomCrop, flip, Normalize, 2 workers), both only iterating. Target: at least 20.

Everything lands in --out-dir (default runs/bench): bench.json, and a folder with each
process's rounds.json and every run's result.json. docs/bench.md gives the figures measured
here, and says what each interval covers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Optional

from ampcompare import compare, plan
from common import console
from record import signals
from ampcompare import stats
from common.config import Config
from record.files import write_json
from record.rundir import check_out_dir

ROUNDS = "rounds.json"  # what each process writes (bench_process.ROUNDS)
FRAMEWORKS = ("lightning", "fabric", "accelerate", "control")
COVERS = (
    "each interval: Student's t over the figure's spread between the bench's processes (their "
    "count less one degrees of freedom), or the spread of the rounds within them where that is "
    "wider; the noise between processes is in it"
)


def run(processes: int, rounds: int, linear_rounds: int, base: Config) -> int:
    """Run the bench's processes one after another, pool what they measured, print the table
    and write bench.json. The exit code: 0, or 130 when a signal stopped it (what was
    measured is kept and pooled)."""
    check_out_dir(base.out_dir)
    folder = plan.new_folder(base.out_dir)
    parts, stopped, seconds = [], False, []
    for i in range(processes):
        out_dir = os.path.join(folder, f"process-{i + 1}")
        try:
            with signals.deferred():  # a signal now is passed on to the process by _wait
                code, last = _process(base, out_dir, rounds, linear_rounds)
        except KeyboardInterrupt:  # held back while the process ran: it has written its part
            code, last = 130, None
        part = _read(out_dir)
        if part is not None:
            parts.append(part)
            seconds.append(part.get("seconds"))
        if code != 0:
            stopped = code == 130 or (part or {}).get("interrupted", False)
            if not stopped:
                console.say(f"ampcompare: warning: bench process {i + 1}: {last}", err=True)
            if stopped or part is None:
                break
    signals.absorb_from_now()  # from here on a signal interrupts nothing: bench.json is whole
    report = pooled(parts)
    report.update(
        command=" ".join(sys.argv),
        processes=len(parts),
        rounds=rounds,
        linear_rounds=linear_rounds,
        covers=COVERS,
        seconds=seconds,
        interrupted=stopped,
        env={**((parts[0].get("env") if parts else None) or {}), "threads": _threads(parts)},
    )
    write_json(os.path.join(base.out_dir, "bench.json"), report)
    console.say(table(report))
    env = report["env"]
    console.say(
        f"\n{env.get('device_name')}, {env.get('threads')} threads (1 for the linear model), "
        f"torch {env.get('torch')}, lightning {env.get('lightning')}, accelerate "
        f"{env.get('accelerate')}; {len(parts)} process{'es' * (len(parts) != 1)} pooled "
        f"({COVERS}); "
        f"{base.out_dir}/bench.json, runs in {folder}"
    )
    if stopped:
        console.say(
            f"ampcompare: bench interrupted; {base.out_dir}/bench.json holds what was measured",
            err=True,
        )
        return 130
    return 0


def _process(base: Config, out_dir: str, rounds: int, linear_rounds: int):
    """One bench process, to its end: (exit code, its last line on stderr)."""
    args = [
        "bench",
        "--one-process",
        "--rounds",
        str(rounds),
        "--linear-rounds",
        str(linear_rounds),
        "--synthetic-size",
        str(base.synthetic_size),
        "--batch-size",
        str(base.batch_size),
        "--accelerator",
        base.accelerator,
        "--out-dir",
        out_dir,
    ]
    proc = subprocess.Popen(
        [*compare.ARM_COMMAND, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=compare.ROOT,
        start_new_session=True,
        preexec_fn=signals.die_with_parent,
    )
    stderr, interrupted = compare._wait(proc)
    lines = [line for line in stderr.splitlines() if line.strip()]
    code = 130 if interrupted and proc.returncode else proc.returncode
    return code, lines[-1] if lines else f"exit code {proc.returncode}"


def _read(out_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(out_dir, ROUNDS), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError):
        return None


def _threads(parts) -> Optional[int]:
    return parts[0].get("threads") if parts else None


# --- pooling: one figure per process, then across them ------------------------------------


def pooled(parts: list) -> dict:
    """Every figure of the bench, pooled over the processes that measured it."""
    linear = [p["linear"] for p in parts if "error" not in p.get("linear", {"error": 1})]
    small = [p["small"] for p in parts if "error" not in p.get("small", {"error": 1})]
    loader = [p["loader"] for p in parts if "error" not in p.get("loader", {"error": 1})]
    return {
        **_framework_costs(linear, _error(parts, "linear")),
        **_precisions(small, _error(parts, "small")),
        **(_cost_shares(linear, small) if linear and len(linear) == len(small) else {}),
        **_loaders(loader, _error(parts, "loader")),
    }


def _error(parts, name) -> str:
    errors = [p[name]["error"] for p in parts if "error" in p.get(name, {})]
    return errors[0] if errors else "no process measured it"


def _sample(rounds, name="") -> stats.Sample:
    return stats.Sample(rounds, name)


def _log_figure(logs, variances, words, target=None, unit="") -> dict:
    """A figure measured once per process on the log scale (a ratio, a rate), pooled."""
    mean, half, df = stats.across(logs, variances)
    est = _estimate(math.exp(mean), math.exp(mean - half), math.exp(mean + half), logs, df)
    return estimate_entry(est, words(est), unit, target=target)


def _linear_figure(values, variances, words, unit="", scale=1.0, target=None) -> dict:
    mean, half, df = stats.across(values, variances)
    est = _estimate(mean, mean - half, mean + half, values, df)
    return estimate_entry(est, words(est), unit, scale, target)


def _estimate(value, lo, hi, per_process, df) -> stats.Estimate:
    short = (
        None
        if df >= stats.MIN_DF
        else f"not enough processes to tell: {len(per_process)}, need ≥ {stats.MIN_DF + 1} "
        f"(--processes {stats.MIN_DF + 1})"
    )
    return stats.Estimate(value, lo, hi, (len(per_process),), (), df, short)


def estimate_entry(
    est: stats.Estimate, words: str, unit: str = "", scale: float = 1.0, target=None
):
    out = {
        "estimate": est.value * scale,
        "interval": [est.lo * scale, est.hi * scale],
        "processes": est.runs[0],
        "df": est.df,
        "unit": unit,
        "verdict": words,
        "no_verdict": est.short,
    }
    if target is not None:
        out.update(target=target[0], target_verdict=stats.target_words(est, *target))
    return out


def _costs(linear: list, arm: str) -> tuple[list, list, list]:
    """Per process: the arm's cost a step in seconds (plain's step times its ratio less 1),
    its variance, and plain's step."""
    costs, variances, plains = [], [], []
    for part in linear:
        plain = _sample(part["plain"])
        d, var = stats.paired_logs(_sample(part[arm]), plain)
        costs.append(plain.value * math.expm1(d))
        variances.append((plain.value * math.exp(d)) ** 2 * var)
        plains.append(plain.value)
    return costs, variances, plains


def _framework_costs(linear: list, why: str) -> dict:
    names = [f"{arm}_cost_per_step" for arm in FRAMEWORKS] + ["control_ratio"]
    if not linear:
        return {k: {"error": why} for k in names}
    report = {}
    for arm in FRAMEWORKS:
        costs, variances, plains = _costs(linear, arm)
        base = math.exp(sum(math.log(p) for p in plains) / len(plains))
        report[f"{arm}_cost_per_step"] = _linear_figure(
            costs, variances, lambda e, b=base: stats.overhead_words(e, b), "µs", 1e6
        )
    logs = [stats.paired_logs(_sample(p["control"]), _sample(p["plain"])) for p in linear]
    control = _log_figure([d for d, _ in logs], [v for _, v in logs], stats.time_ratio_words)
    control["target_verdict"] = _control_verdict(control, "the method is biased here")
    report["control_ratio"] = control
    cost = report["lightning_cost_per_step"]
    lo, hi = cost["interval"]
    half = (hi - lo) / 2 / abs(cost["estimate"]) if cost["estimate"] else None
    cost["half_width_share"] = half
    cost["target_verdict"] = _resolved(cost, half)
    return report


TOO_FEW = "cannot tell: too few processes"


def _resolved(cost: dict, half) -> str:
    """Whether Lightning's cost a step is resolved: its interval excludes 0 and is at most a
    quarter of the estimate either side."""
    if cost["no_verdict"]:
        return TOO_FEW
    lo, hi = cost["interval"]
    if lo > 0 and half is not None and half <= 0.25:
        return f"resolved: excludes 0, half-width {half:.0%} of the estimate (target ≤ 25%)"
    width = "–" if half is None else f"{half:.0%}"
    return (
        f"not resolved: interval [{lo:.0f}, {hi:.0f}] µs, half-width {width} of the "
        f"estimate (target: excludes 0, ≤ 25%)"
    )


def _control_verdict(control: dict, otherwise: str) -> str:
    """Whether plain against plain showed no difference, as it should; on too few processes,
    why that cannot be told (an interval over one process holds none of the noise between
    processes, so its 'FAILS' or 'holds' would be a guess)."""
    if control["no_verdict"]:
        return TOO_FEW
    if control["interval"][0] <= 1 <= control["interval"][1]:
        return "holds: its interval contains 1"
    return f"FAILS: plain against plain should show no difference; {otherwise}"


def _cost_shares(linear: list, small: list) -> dict:
    """The linear model's cost per step as a share of the small CNN's 32-true step, process by
    process: what a framework costs where a step does real work."""
    report = {}
    steps = [_sample(p["32-true"]).value for p in small]
    for arm in ("lightning", "fabric", "accelerate"):
        costs, variances, _ = _costs(linear, arm)
        shares = [c / s for c, s in zip(costs, steps)]
        share_vars = [v / s**2 for v, s in zip(variances, steps)]
        step = math.exp(sum(math.log(s) for s in steps) / len(steps))
        report[f"{arm}_cost_share_of_small_step"] = _linear_figure(
            shares,
            share_vars,
            lambda e, step=step: (
                f"{e.value:.2%} of the small CNN's {stats.duration(step)} step "
                f"{stats.span(e.lo * 100, e.hi * 100)}%"
            ),
            "share",
        )
    return report


def _precisions(small: list, why: str) -> dict:
    names = ("bf16_over_fp32", "control_over_fp32", "data_wait_fraction")
    if not small:
        return {k: {"error": why} for k in names}
    report = {}
    for name, arm in (("bf16_over_fp32", "bf16-mixed"), ("control_over_fp32", "control")):
        logs = [stats.paired_logs(_sample(p[arm]), _sample(p["32-true"])) for p in small]
        report[name] = _log_figure(
            [d for d, _ in logs], [v for _, v in logs], stats.time_ratio_words
        )
    control = report["control_over_fp32"]
    control["target_verdict"] = _control_verdict(
        control, "the ratios above it are narrower than this machine's noise"
    )
    report["bf16_over_fp32_activation_memory"] = small[0]["activation_ratio"]
    fractions, variances = [], []
    for p in small:
        per_round = [sum(w) / sum(t) for w, t in zip(p["waits"], p["32-true"]) if sum(t) > 0]
        fractions.append(sum(map(sum, p["waits"])) / sum(map(sum, p["32-true"])))
        n = len(per_round)
        spread = sum((f - sum(per_round) / n) ** 2 for f in per_round) / (n - 1) if n > 1 else 0
        variances.append(spread / n if n else 0.0)
    report["data_wait_fraction"] = _linear_figure(
        fractions,
        variances,
        lambda e: (
            f"{e.value:.2%} of a step waits for data {stats.span(e.lo * 100, e.hi * 100)}%"
        ),
        target=(0.02, True),
    )
    return report


def _loaders(loader: list, why: str) -> dict:
    names = ("loader_over_torchvision", "loader_images_per_s", "torchvision_images_per_s")
    if not loader:
        return {k: {"error": why} for k in names}
    # their time per image over ours: our speed over theirs
    logs = [stats.paired_logs(_sample(p["theirs"]), _sample(p["ours"])) for p in loader]
    report = {}
    report["loader_over_torchvision"] = _log_figure(
        [d for d, _ in logs], [v for _, v in logs], stats.speed_words, target=(20, False)
    )
    for name, key in (("loader_images_per_s", "ours"), ("torchvision_images_per_s", "theirs")):
        samples = [_sample(p[key]) for p in loader]
        logs = [-s.log_value for s in samples]  # images a second: 1 / seconds an image
        variances = [s.within() for s in samples]
        report[name] = _log_figure(logs, variances, lambda e: "measured", unit="images/s")
    return report


def table(report: dict) -> str:
    lines = [f"{'measure':<34} {'estimate [95% interval]':<28} verdict"]
    for name, value in report.items():
        if isinstance(value, float):
            lines.append(f"{name:<34} {value:<28.3f} measured")
        if not isinstance(value, dict) or name in ("env",):
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
