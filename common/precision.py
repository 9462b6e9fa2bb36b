"""Precision names and the policy each loop applies as switches (autocast, GradScaler, the
dtype the model is cast to).

Lightning's strings are canonical. The rungs, from the top: 32-true (fp32 throughout);
16-mixed and bf16-mixed (autocast computes in the half type, the weights, gradients and
optimizer state stay fp32; fp16 adds a loss scaler); bf16-true and 16-true (the model, its
inputs, gradients and optimizer state are all in the half type: no fp32 copy anywhere). Under
--strategy fsdp one more, bf16-fsdp: FSDP2's own mixed precision (common/sharding.py), whole
modules computing in bf16 from fp32 shards, a mechanism that autocast's bf16-mixed is not. The
policy is resolved once, before anything runs, and the effective precision is what gets
recorded: nothing ever runs a precision other than that one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from common.errors import Unavailable, UsageError

CANONICAL = ("32-true", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "bf16-fsdp")
SHARDED_ONLY = ("bf16-fsdp",)  # rungs that exist only under --strategy fsdp
HALF = {"16": torch.float16, "bf16": torch.bfloat16}
ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}
# apex's opt levels and the precision each runs. O0 fp32; O1 patches torch functions to cast
# per op (like autocast) with dynamic loss scaling; O2 casts the model to fp16, keeps fp32
# master weights and fp32 BatchNorm; O3 is pure fp16.
OPT_LEVELS = {"O0": "32-true", "O1": "16-mixed", "O2": "16-mixed", "O3": "16-true"}


def canonical(name: str) -> str:
    name = str(name).strip()
    name = ALIASES.get(name, name)
    if name not in CANONICAL and name != "auto":
        raise UsageError(
            f"unknown precision {name!r}: use one of {', '.join(CANONICAL)} "
            f"(or 32, 16, bf16, auto)"
        )
    return name


def mixed_default(device: torch.device) -> str:
    """The mixed precision that is fast on this device: fp16 kernels on CPU are ~100x slower."""
    return "16-mixed" if device.type == "cuda" else "bf16-mixed"


@dataclass(frozen=True)
class Policy:
    requested: str
    effective: str

    @property
    def autocast(self) -> bool:
        return self.effective.endswith("-mixed")

    @property
    def dtype(self) -> Optional[torch.dtype]:
        """The half type this rung computes in (None at 32-true)."""
        return HALF.get(self.effective.split("-")[0])

    @property
    def cast(self) -> Optional[torch.dtype]:
        """The type the model and its inputs are cast to: a true rung's half type, else None
        (the weights stay fp32)."""
        return self.dtype if self.effective.endswith("-true") else None

    @property
    def param_dtype(self) -> Optional[torch.dtype]:
        """The type FSDP2 gathers the parameters in (bf16-fsdp's MixedPrecisionPolicy), else
        None."""
        return self.dtype if self.effective.endswith("-fsdp") else None

    @property
    def framework(self) -> str:
        """The precision a framework (Lightning, Fabric) is asked for: at bf16-fsdp its own
        32-true, the sharding's policy doing the casts."""
        return "32-true" if self.param_dtype else self.effective

    @property
    def scaler(self) -> bool:
        # bf16 has fp32's exponent range: gradients do not underflow, so no loss scaling.
        return self.effective == "16-mixed"

    def to_dict(self) -> dict:
        return {"requested": self.requested, "effective": self.effective}


def refuse_unless_ran(framework: str, chosen: str, policy: Policy, device: str) -> None:
    """Ours, for the frameworks that pick the precision themselves (Lightning, Fabric): read
    back what it chose, and refuse to record a run of another precision than asked."""
    if chosen != policy.framework:
        raise Unavailable(
            f"{framework} chose {chosen} for {policy.framework} on {device}; refusing to "
            f"record the wrong one"
        )


# The precisions Lightning's and Fabric's ModelParallelStrategy (FSDP2) accept: no 16-mixed.
MODEL_PARALLEL = ("32-true", "bf16-mixed", "bf16-true", "16-true")


def refuse_unless_model_parallel_runs(framework: str, requested: str, device) -> None:
    """Ours, before the framework is built: its ModelParallelStrategy refuses 16-mixed with a
    traceback, or, given a plugin (as the arms give it on a CPU), would not check at all."""
    policy, _ = resolve(requested, device)
    if policy.framework not in MODEL_PARALLEL:
        raise Unavailable(
            f"{framework}: --strategy fsdp at {policy.effective}: its ModelParallelStrategy "
            f"allows {', '.join(MODEL_PARALLEL)}; plain runs {policy.effective} under FSDP"
        )


def resolve(requested: str, device: torch.device) -> tuple[Policy, list[str]]:
    """Policy for `requested` on `device`, plus warnings to show the user."""
    name = canonical(requested)
    effective = mixed_default(device) if name == "auto" else name
    warnings = []
    if (
        effective.startswith("bf16")
        and device.type == "cuda"
        and not torch.cuda.is_bf16_supported()
    ):
        raise Unavailable(
            f"{effective} needs a GPU with bfloat16 support (compute capability "
            f"8.0+); {torch.cuda.get_device_name(device)} has none: use 16-mixed"
        )
    if effective.startswith("16-") and device.type == "cpu":
        what = "with a GradScaler" if effective == "16-mixed" else "throughout"
        warnings.append(
            f"{effective} on CPU runs real fp16 {what}, which has no fast CPU "
            f"kernels (about 100x slower than fp32); bf16-mixed is the fast CPU choice"
        )
    return Policy(requested=name, effective=effective), warnings
