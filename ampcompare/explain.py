"""Why a speed-up is what it is: one line per precision pair, from what the runs recorded
(device, compute capability and tensor cores, TF32, CPU bf16 instructions, MFU, data wait,
skipped fp16 steps and the loss scale), and the reference benchmark's figures to set beside it.
"""

from __future__ import annotations

from typing import Optional

from ampcompare.findings import Cell, Group, Judged
from common import peaks

REFERENCE = (
    "the benchmark this tool grew from — Lightning precision 16 against 32, CIFAR-10, "
    "batch 256, on two P40s and on two T4s — measured GPU memory about half, epoch "
    "time −23% on the P40s (1.30× the speed) and −30% on the T4s (1.43×), and "
    "accuracy about the same."
)


def lines(group: Group, quote=str) -> list[str]:
    """One sentence per mixed precision in the group, about its first impl that has a 32-true
    run to compare with. `quote` is applied to every value that comes from a record (the
    report's Markdown escapes them)."""
    table, ratios, env = group.precisions, group.ratios, group.env
    base = {c.impl: c for c in table.get("32-true", {}).values()}
    out = []
    for precision, cells in table.items():
        label = next((k for k in cells if precision in ratios.get(k, {})), None)
        if precision == "32-true" or label is None:
            continue
        mixed, ref, ratio = cells[label], base[cells[label].impl], ratios[label][precision]
        speed = ratio.speedup.verdict if ratio.speedup else "no step times recorded"
        parts = [
            f"{quote(precision)} against 32-true ({quote(label)}): {speed}",
            hardware(env, precision, quote, ratio.speedup),
        ]
        mfu = [c.median("mfu") for c in (ref, mixed)]
        if None not in mfu:
            parts.append(f"MFU {mfu[0]:.1%} at 32-true, {mfu[1]:.1%} at {quote(precision)}")
        else:
            parts.append(quote(peaks.peak(env, precision)[1]))
        wait = [c.median("data_wait_fraction") for c in (ref, mixed)]
        if None not in wait:
            parts.append(
                f"waiting for data took {wait[0]:.0%} and {wait[1]:.0%} of training "
                f"time"
                + (" — the loader, not the math, limits this" if max(wait) > 0.1 else "")
            )
        if precision == "16-mixed":
            parts.append(scaler(mixed))
        out.append("; ".join(p for p in parts if p) + ".")
    return out


def hardware(env: dict, precision: str, quote=str, speedup: Optional[Judged] = None) -> str:
    """What the device does differently at this precision. A direction (faster, slower) is
    said only where the measured speed-up (`speedup`, the report's) shows it too: the
    explanation never contradicts the figure beside it."""
    if env.get("device") != "cuda":
        if precision.startswith("16-"):  # 16-mixed, 16-true: fp16
            slower = speedup and speedup.estimate.claims(1.0) and speedup.estimate.hi < 1
            return "this CPU has no fast fp16 kernels" + (
                ", which is why fp16 ran slower than fp32 here" if slower else ""
            )
        if env.get("cpu_bf16"):
            return (
                "this CPU has bf16 dot-product instructions (avx512_bf16 or amx_bf16), so "
                "oneDNN can compute in bf16; bf16 also halves the bytes each layer saves "
                "and moves"
            )
        return (
            "this CPU has no bf16 instructions (no avx512_bf16 or amx_bf16): bf16 is "
            "widened to fp32 for the math, and only the bytes moved are halved"
        )
    name, cc = quote(env.get("device_name", "the GPU")), quote(env.get("cuda_capability"))
    if not env.get("tensor_cores"):
        return (
            f"{name} (compute capability {cc}) has no tensor cores: whatever "
            f"{quote(precision)} gains here comes from halved memory traffic, not faster "
            f"math"
        )
    fp32 = (
        "32-true ran its matmuls and convolutions as TF32 on tensor cores, so fp32 was "
        "already fast"
        if env.get("tf32")
        else "32-true ran on the fp32 units (TF32 off)"
    )
    return (
        f"{name} (compute capability {cc}) runs {quote(precision)}'s matmuls and "
        f"convolutions on tensor cores; {fp32}"
    )


def scaler(cell: Cell) -> str:
    skipped = cell.median("skipped_steps")
    first, last = cell.median("loss_scale_first"), cell.median("loss_scale_last")
    scale = (
        f", loss scale {first:g} at the first epoch's end, {last:g} at the last"
        if first is not None and last is not None
        else ""
    )
    return (
        f"the GradScaler skipped {skipped:g} steps (median over runs){scale}"
        if skipped is not None
        else ""
    )
