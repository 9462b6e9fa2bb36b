"""What the Lightning Trainer costs per epoch against the hand-written loop.

Both arms run side by side in one process, alternating (the order flips each repeat), several
epochs each, the first (warm-up) epoch of every run left out. One process, not one per run:
on a shared 2-core machine the speed of a fresh process varied by +-15% from one process to
the next, which buried a 2% difference; within one process both arms see the same machine.
The machine's speed still drifts over minutes, so the headline is the median over repeats of
each repeat's ratio (two neighbouring runs see the same machine); the ratio of the pooled
medians is printed beside it. Both, with every run, are written to one folder.

    .venv/bin/python benchmarks/lightning_overhead.py            # small CNN, batch 256, CPU
    .venv/bin/python benchmarks/lightning_overhead.py --precisions 32-true,bf16-mixed

Lightning documents its overhead against a plain loop as about 0.06 s per epoch; the target
here is a ratio of at most 1.02 on the small model at batch 256 on CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ampcompare import compare, report  # noqa: E402 (compare: the run folder)
from common.config import Config  # noqa: E402
from common.precision import canonical  # noqa: E402
from lightning_impl import train as lightning  # noqa: E402
from plain_torch import train as plain  # noqa: E402

IMPLS = {"plain": plain, "lightning": lightning}


def ratio_of_medians(records, key):
    """lightning/plain over one repeat's two runs (neighbours in time: the same machine)."""
    return (statistics.median(epoch_times(records, "lightning", key))
            / statistics.median(epoch_times(records, "plain", key)))


def epoch_times(records, impl, key):
    return [e[key] for r in records if r["impl"] == impl and r["status"] == "ok"
            for e in r["epochs"][1:]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--precisions", default="32-true", help="comma-separated [default: 32-true]")
    p.add_argument("--repeats", type=int, default=8, help="runs per arm [default: 8]")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run, the first is warm-up [default: 3]")
    p.add_argument("--synthetic-size", type=int, default=5000, help="training images [default: 5000]")
    p.add_argument("--batch-size", type=int, default=256, help="[default: 256]")
    p.add_argument("--model", default="small", help="[default: small]")
    p.add_argument("--accelerator", default="cpu", help="[default: cpu]")
    p.add_argument("--out-dir", default="runs/bench", help="[default: runs/bench]")
    args = p.parse_args(argv)

    cfg = Config(dataset="synthetic", model=args.model, batch_size=args.batch_size,
                 epochs=args.epochs, synthetic_size=args.synthetic_size,
                 accelerator=args.accelerator, out_dir=args.out_dir, quiet=True).validate()
    precisions = [canonical(x) for x in args.precisions.split(",")]
    os.makedirs(cfg.out_dir, exist_ok=True)
    folder = compare.new_folder(cfg.out_dir)
    records, total = [], args.repeats * len(precisions) * 2
    for r in range(args.repeats):
        for precision in precisions:
            for impl in ("plain", "lightning") if r % 2 == 0 else ("lightning", "plain"):
                run_id = f"{impl}-{precision}-r{r}"
                print(f"[{len(records) + 1}/{total}] {run_id}", file=sys.stderr)
                result = IMPLS[impl].train(dataclasses.replace(
                    cfg, precision=precision, run_id=run_id, repeat=r, out_dir=folder))
                records.append(result.to_dict())
    out = {"command": " ".join(sys.argv), "config": cfg.to_dict(), "precisions": {}}
    print(f"\n{'precision':<12} {'what':<14} {'plain s':>9} {'lightning s':>12} {'ratio':>7} "
          f"{'[min–max]':<15} {'pooled':>8}  epochs\n(seconds: medians over epochs; ratio: "
          f"lightning/plain, median over repeats of each repeat's ratio; pooled: ratio of the "
          f"medians)")
    for precision in precisions:
        recs = [r for r in records if r["precision"]["requested"] == precision]
        out["precisions"][precision] = {}
        for key in ("epoch_time_s", "train_time_s"):
            plain, light = epoch_times(recs, "plain", key), epoch_times(recs, "lightning", key)
            if not plain or not light:
                print(f"{precision:<12} {key:<14} runs failed: see {folder}")
                continue
            mp, ml = statistics.median(plain), statistics.median(light)
            paired = [ratio_of_medians([x for x in recs if x["repeat"] == r], key)
                      for r in range(args.repeats)]
            ratio = statistics.median(paired)
            out["precisions"][precision][key] = {"plain_median_s": mp, "lightning_median_s": ml,
                                                 "ratio": ratio, "ratio_of_pooled_medians": ml / mp,
                                                 "ratio_per_repeat": paired,
                                                 "epochs_each": [len(plain), len(light)]}
            print(f"{precision:<12} {key:<14} {mp:>9.3f} {ml:>12.3f} {ratio:>7.3f} "
                  f"[{min(paired):.3f}–{max(paired):.3f}] {ml / mp:>8.3f}  {len(plain)}+{len(light)}")
    report.write(report.load([folder]), folder)
    with open(os.path.join(folder, "lightning_overhead.json"), "w") as f:
        json.dump(out, f, indent=1)
    env = next((r["env"] for r in records if r["status"] == "ok"), {})
    print(f"\n{env.get('device_name')}, {env.get('threads')} threads, torch {env.get('torch')}, "
          f"lightning {env.get('lightning')}; runs and report in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
