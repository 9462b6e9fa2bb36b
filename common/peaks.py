"""Dense peak throughput of the GPUs this project knows, for model FLOPs utilisation (MFU).

TFLOP/s, dense. NVIDIA quotes some tensor-core figures "with sparsity", which are twice the
dense peak: those are halved here. Lightning's get_available_flops is not used: "NVIDIA H200"
finds no entry there, and its H200 values are the sparse ones. A GPU not in this table, and
every CPU, gets no MFU, and the reason is recorded instead.

Sources (NVIDIA data sheets):
  H200 SXM   https://www.nvidia.com/en-us/data-center/h200/
  H100       https://www.nvidia.com/en-us/data-center/h100/  (SXM and PCIe columns)
  A100       https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/
             nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
  V100       https://images.nvidia.com/content/technologies/volta/pdf/
             volta-v100-datasheet-update-us-1165301-r5.pdf
  T4         https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-t4/
             t4-tensor-core-datasheet-951643.pdf
  P40        https://images.nvidia.com/content/pdf/tesla/
             184427-Tesla-P40-Datasheet-NV-Final-Letter-Web.pdf
             (no tensor cores; fp16 runs at 1/64 of the fp32 rate on GP102)
"""

from __future__ import annotations

import re
from typing import Optional

# (pattern on torch.cuda.get_device_name, name, {math: dense TFLOP/s}); first match wins.
PEAKS = (
    (r"\bH200\b", "H200 SXM", {"fp32": 67.0, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4}),
    (
        r"\bH100\b.*\bPCIe\b",
        "H100 PCIe",
        {"fp32": 51.2, "tf32": 378.0, "fp16": 756.0, "bf16": 756.0},
    ),
    (
        r"\bH100\b(?!.*\bNVL\b)",
        "H100 SXM",
        {"fp32": 66.9, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4},
    ),
    (r"\bA100\b", "A100", {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0}),
    (r"\bV100\b.*\bSXM2\b", "V100 SXM2", {"fp32": 15.7, "fp16": 125.0}),
    (r"\bT4\b", "T4", {"fp32": 8.1, "fp16": 65.0}),
    (r"\bP40\b", "P40", {"fp32": 11.76, "fp16": 11.76 / 64}),
)


def math_of(precision: str, tf32: bool) -> str:
    """Which peak a run is measured against: 32-true with TF32 on (Ampere and newer) uses the
    TF32 tensor-core peak."""
    if precision == "32-true":
        return "tf32" if tf32 else "fp32"
    return "bf16" if precision == "bf16-mixed" else "fp16"


def peak(env: dict, precision: str) -> tuple[Optional[float], str]:
    """(dense peak TFLOP/s, what it is) for this device and precision, or (None, why not)."""
    if env.get("device") != "cuda":
        return None, "no MFU on CPU: this table holds GPU peaks only"
    name = env.get("device_name") or "?"
    for pattern, known, peaks in PEAKS:
        if re.search(pattern, name):
            math = math_of(precision, bool(env.get("tf32")))
            if math not in peaks:
                return None, f"no MFU: the {known} has no {math} peak (no {math} tensor cores)"
            return peaks[math], f"{known} dense {math} peak, {peaks[math]:g} TFLOP/s"
    return None, f"no MFU: {name} is not in the peak table (common/peaks.py)"
