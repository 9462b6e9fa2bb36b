"""The GPU check's verdicts: each mixed precision against 32-true, from a report's summary.json,
beside the targets and the reference benchmark's figures.

    python scripts/gpu_targets.py runs/gpu-check/report/summary.json

Targets (a GPU with tensor cores, TF32 off): 16-mixed at least 2x the speed of 32-true
(32-true's step time over 16-mixed's, judged on its 95% interval: ampcompare/stats.py),
activation memory at most 0.55x and the CUDA allocator's peak at most 0.65x of 32-true's. The
peak is taken less the image sets kept on the GPU (the same at every precision; the reference
kept its data on the host), where the record has that figure.
The reference benchmark (Lightning precision 16 against 32, CIFAR-10, batch 256, two P40s and
two T4s): memory about half, epoch time -23% (P40) and -30% (T4), accuracy about the same. apex
is measured, not held to the targets: its speed is apex's. It prints; it never fails the run.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ampcompare.explain import REFERENCE  # noqa: E402
from ampcompare import stats  # noqa: E402

TARGETS = {"speed": 2.0, "activations": 0.55, "allocator": 0.65}


def median(cell: dict, metric: str):
    """The median of a summary.json cell's spread of metric (None where the cell has none)."""
    return (cell.get(metric) or {}).get("median")


def ratio(a, b):
    return a / b if a is not None and b else None


def verdict(value, target, at_least):
    if value is None:
        return "n/a"
    good = value >= target if at_least else value <= target
    return f"{value:.2f}x {'meets' if good else 'misses'} {'>=' if at_least else '<='} {target}"


def lines(summary: dict) -> list[str]:
    out = []
    for group in summary["devices"]:
        table, env = group["precisions"], group["env"]
        out.append(
            f"{group['device']}  (tf32 {env.get('tf32')}, tensor cores "
            f"{env.get('tensor_cores')})"
        )
        base = {c["impl"]: c for c in table.get("32-true", {}).values()}
        for precision, cells in table.items():
            if precision == "32-true":
                continue
            for label, cell in cells.items():
                ref = base.get(cell["impl"])
                if not ref or not cell["ok"] or not ref["ok"]:
                    continue
                targeted = cell["impl"] != "apex" and precision == "16-mixed"
                speedup = (group["ratios"].get(label, {}).get(precision) or {}).get("speedup")
                acts = ratio(median(cell, "activation_bytes"), median(ref, "activation_bytes"))
                key = (
                    "peak_beyond_data_bytes"
                    if median(ref, "peak_beyond_data_bytes")
                    else "peak_memory_bytes"
                )
                peak = ratio(median(cell, key), median(ref, key))
                acc = [median(c, "final_test_acc") for c in (ref, cell)]
                mfu = [median(c, "mfu") for c in (ref, cell)]
                wait = [median(c, "data_wait_fraction") for c in (ref, cell)]
                cuda = env.get("device") == "cuda"
                acts_text = verdict(acts, TARGETS["activations"], False) if targeted else None
                peak_text = verdict(peak, TARGETS["allocator"], False) if targeted else None
                out.append(
                    f"  {label:<11} {precision:<10} speed "
                    + _speed(speedup, targeted)
                    + f"; activations {acts_text or _ratio(acts)}"
                    + (
                        "; allocator peak beyond data "
                        if key != "peak_memory_bytes"
                        else "; allocator peak "
                    )
                    + ((peak_text or _ratio(peak)) if cuda else "n/a (CPU: process RSS only)")
                    + (f"; accuracy {acc[1] - acc[0]:+.4f}" if None not in acc else "")
                    + (
                        f"; MFU {mfu[0]:.1%} -> {mfu[1]:.1%}"
                        if None not in mfu
                        else "; MFU n/a"
                    )
                    + (f"; data wait {wait[0]:.1%} / {wait[1]:.1%}" if None not in wait else "")
                    + (
                        f"; skipped fp16 steps {median(cell, 'skipped_steps'):g}"
                        if precision == "16-mixed" and median(cell, "skipped_steps") is not None
                        else ""
                    )
                )
        out.append(f"  Reference: {REFERENCE}")
    return out


def _speed(speedup, targeted: bool) -> str:
    """The step-time speed-up with its interval, and against its target where it has one."""
    if not speedup:
        return "n/a"
    est = stats.Estimate.from_dict(speedup)
    if not targeted:
        return speedup["verdict"]
    words = stats.target_words(est, TARGETS["speed"], at_most=False)
    if est.short:  # the verdict has just said why
        words = words.removesuffix(f": {est.short}")
    return f"{speedup['verdict']}: {words}"


def _ratio(value):
    return f"{value:.2f}x" if value is not None else "n/a"


def main(argv) -> int:
    try:
        with open(argv[0], encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError) as e:
        print(f"gpu_targets: no report to read ({e})", file=sys.stderr)
        return 1
    print("\n".join(lines(summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
