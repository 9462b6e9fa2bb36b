"""What Lightning and Accelerate read from the environment, taken out before any arm runs.

Both frameworks let environment variables change what they train, silently: Lightning's
Trainer takes any argument it is not given from PL_TRAINER_<ARG> (accumulate_grad_batches,
max_steps, ...); Fabric lets LT_DEVICES, LT_PRECISION, LT_STRATEGY, ... override the arguments
it is given; Accelerate's ACCELERATE_GRADIENT_ACCUMULATION_STEPS divides every loss,
ACCELERATE_DYNAMO_BACKEND compiles the model, ACCELERATE_TORCH_DEVICE moves it. A record must
say what ran, so every arm runs with these cleared: each one found is named in one warning line
(in the process the user started) and kept in the record's env (`cleared_environment`). What
the user plainly asked for and no arm can honour — DeepSpeed, FSDP, Megatron-LM, SageMaker, fp8
through Accelerate, a `fabric run` launch — is refused in one line instead.
docs/bad-input.md lists each variable and what happens to it.

Left alone: the launchers' own variables (RANK, WORLD_SIZE, MASTER_ADDR, ...: common/ranks.py
decides about those), and the ones that change only logging (ACCELERATE_LOG_LEVEL,
ACCELERATE_ENABLE_RICH, ACCELERATE_DEBUG_MODE).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

from common.errors import UsageError

# Families cleared whole: every variable whose name starts so.
PREFIXES = (
    "PL_",
    "LT_",
    "ACCELERATE_",
    "FSDP_",
    "DEEPSPEED_",
    "MEGATRON_LM_",
    "PARALLELISM_CONFIG_",
)
LEFT = ("ACCELERATE_LOG_LEVEL", "ACCELERATE_ENABLE_RICH", "ACCELERATE_DEBUG_MODE")
TRUE = ("1", "true", "yes", "y", "on", "t")
# Switches that ask for a training this tool does not run: refused when on.
REFUSED = {
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
    "ACCELERATE_USE_FSDP": "FSDP through Accelerate",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
    "ACCELERATE_USE_PARALLELISM_CONFIG": "Accelerate's parallelism config",
    "ACCELERATE_USE_SAGEMAKER": "SageMaker",
    "LT_CLI_USED": "a launch by `fabric run`",
}
STRATEGIES = ("LT_STRATEGY", "PL_TRAINER_STRATEGY")  # refused when they name these
SHARDED = ("deepspeed", "fsdp")
INHERITED = (
    "AMPCOMPARE_CLEARED_ENV"  # what a parent process cleared, for its children's records
)


def refusal(environ) -> Optional[str]:
    """The one line that refuses this environment, or None."""
    for name, what in REFUSED.items():
        if environ.get(name, "").strip().lower() in TRUE:
            return (
                f"{name}={environ[name]} asks for {what}, which ampcompare does not run; "
                f"unset it (docs/bad-input.md)"
            )
    level = environ.get("ACCELERATE_LOG_LEVEL")
    if level is not None and not isinstance(logging.getLevelName(level.upper()), int):
        return (
            f"ACCELERATE_LOG_LEVEL={level} is not a logging level (DEBUG, INFO, WARNING, "
            f"ERROR, CRITICAL); Accelerate fails on it: set one, or unset it"
        )
    if environ.get("ACCELERATE_FP8_BACKEND", "").strip():
        return (
            f"ACCELERATE_FP8_BACKEND={environ['ACCELERATE_FP8_BACKEND']} asks Accelerate for "
            f"fp8, which ampcompare does not run; unset it"
        )
    for name in STRATEGIES:
        value = environ.get(name, "").lower()
        if any(s in value for s in SHARDED):
            return (
                f"{name}={environ[name]} asks for a sharded strategy, which ampcompare does "
                f"not run; unset it"
            )
    return None


def to_clear(environ) -> dict:
    """The variables (name: value) that would change what an arm trains."""
    return {
        name: value
        for name, value in sorted(environ.items())
        if name.startswith(PREFIXES) and name not in LEFT
    }


def scrub(environ=None, child: bool = False) -> dict:
    """Refuse (UsageError) or clear what the frameworks would read; returns what was cleared
    here, and leaves in the environment, for the records of this process and of the ones it
    starts, all that was cleared: here and, in a `child` (an arm compare started, a rank of
    a job), in the process that started it."""
    environ = os.environ if environ is None else environ
    why = refusal(environ)
    if why:
        raise UsageError(why)
    found = to_clear(environ)
    for name in found:
        del environ[name]
    cleared = {**(inherited(environ) if child else {}), **found}
    environ.pop(INHERITED, None)
    if cleared:
        environ[INHERITED] = json.dumps(cleared, sort_keys=True)
    return found


def inherited(environ=None) -> dict:
    """What this process and the ones that started it cleared (empty when nothing was)."""
    environ = os.environ if environ is None else environ
    try:
        value = json.loads(environ.get(INHERITED) or "{}")
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def warning(found: dict) -> str:
    names = ", ".join(f"{k}={v}" for k, v in found.items())
    return (
        f"ampcompare: warning: cleared {names}: the frameworks would read "
        f"{'it' if len(found) == 1 else 'them'} and train other than the record says "
        f"(docs/bad-input.md)"
    )
