"""A run's summary: the figures its epoch rows add up to, and which steps its timing rests on
(warm-up epochs, or a one-epoch run's first steps, left out)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from common import activations

# The summary's name for each part of the model state (common/model_state.py), and their sum
STATE_BYTES = {
    "parameters": "parameter_bytes",
    "gradients": "gradient_bytes",
    "optimizer": "optimizer_state_bytes",
    "master": "master_weight_bytes",
    "scaler": "scaler_bytes",
}
MODEL_STATE = "model_state_bytes"


# A run of one epoch (or a resumed run's only new one) has no warm-up-free epoch: its first
# steps, slow while the allocator and the kernels' caches fill, are left out instead.
WARMUP_STEPS = 5


def median(values) -> Optional[float]:
    """The median of the values that are not None (None when none are)."""
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def quartiles(values: Sequence[float]) -> Optional[tuple[float, float, float]]:
    """(first quartile, median, third quartile), or None without values."""
    if len(values) == 0:
        return None
    q1, med, q3 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return float(q1), float(med), float(q3)


def timed_steps(epochs: list) -> tuple[list, str]:
    """The step times that timing figures rest on, in order, and the rule that chose them: the
    steps of every epoch that is not a warm-up epoch (the first a process runs: a resumed run
    has two); where every epoch is one, each epoch's steps after its first WARMUP_STEPS (fewer
    when an epoch has fewer than twice that many)."""
    warm = [e.get("warmup", i == 0) for i, e in enumerate(epochs)]
    timed = [e for e, w in zip(epochs, warm) if not w]
    if timed:
        return (
            [t for e in timed for t in e.get("step_times_s") or []],
            "warm-up epochs left out (the first epoch of each process)",
        )
    steps = []
    for e in epochs:
        times = e.get("step_times_s") or []
        steps += times[min(WARMUP_STEPS, len(times) // 2) :]
    return steps, (
        f"every epoch is a warm-up epoch: the first {WARMUP_STEPS} steps of each "
        f"left out (fewer in an epoch of under {2 * WARMUP_STEPS} steps)"
    )


def summarize(epochs: list, env: Optional[dict] = None) -> dict:
    """Medians and the memory peak leave out warm-up epochs (the first a process runs: a resumed
    run has two) when any other epoch is there: a warm-up's CUDA peak holds cuDNN's autotuning.
    Step times follow timed_steps(). On CUDA the allocator's peak is also given less the image
    sets held there (env's data_on_device_bytes): what the precision can change."""
    warm = [e.get("warmup", i == 0) for i, e in enumerate(epochs)]
    timed = [e for e, w in zip(epochs, warm) if not w] or epochs

    saved = next((e["saved_tensors"] for e in epochs if e.get("saved_tensors")), None)
    # what the run keeps between steps, as its last epoch left it
    state = next((e["model_state"] for e in reversed(epochs) if e.get("model_state")), None)
    peak, env = max((e["peak_memory_bytes"] for e in timed), default=None), env or {}
    scales = [e["loss_scale"] for e in epochs if e.get("loss_scale") is not None]
    steps, rule = timed_steps(epochs)
    q1, step, q3 = quartiles(steps) or (None, None, None)
    return {
        "median_step_time_s": step,
        "step_time_q1_s": q1,
        "step_time_q3_s": q3,
        "timed_steps": len(steps),
        "step_timing": rule,
        "median_epoch_time_s": median(e.get("epoch_time_s") for e in timed),
        "images_per_s": median(e.get("images_per_s") for e in timed),
        "achieved_tflops": median(e.get("achieved_tflops") for e in timed),
        "mfu": median(e.get("mfu") for e in timed),
        "data_wait_fraction": median(
            e["data_wait_s"] / e["train_time_s"] for e in timed if e.get("train_time_s")
        ),
        "activation_bytes": activations.total(saved) if saved else None,
        **{name: state.get(part) if state else None for part, name in STATE_BYTES.items()},
        MODEL_STATE: sum(state.get(p) or 0 for p in STATE_BYTES) if state else None,
        "peak_memory_bytes": peak,
        "peak_beyond_data_bytes": peak - env.get("data_on_device_bytes", 0)
        if peak is not None and env.get("device") == "cuda"
        else None,
        "skipped_steps": sum(e.get("skipped_steps") or 0 for e in epochs),
        "loss_scale_first": scales[0] if scales else None,
        "loss_scale_last": scales[-1] if scales else None,
        "final_test_acc": epochs[-1]["test_acc"] if epochs else None,
        "epochs_done": len(epochs),
    }
