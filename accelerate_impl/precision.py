"""What Accelerate really does with a precision it is asked for, read back from the Accelerator
it builds: on a CPU, mixed_precision="fp16" trains fp32 (no autocast, no GradScaler, no
warning; accelerate 1.15), which a record must never call 16-mixed. The arm refuses whatever
it reads back that differs from the precision asked for, so that the refusal ends by itself
once a later Accelerate does run fp16 there."""

from __future__ import annotations

from common import ranks
from common.errors import Unavailable

# Accelerate's names for the precisions: it has no "true" mode (the arm casts the model itself)
MIXED = {
    "32-true": "no",
    "bf16-mixed": "bf16",
    "16-mixed": "fp16",
    "bf16-true": "no",
    "16-true": "no",
}


def runs(accelerator) -> str:
    """The precision an Accelerator will train in: its GradScaler means fp16 autocast with
    loss scaling, native autocast without one bf16, neither fp32."""
    if accelerator.scaler is not None:
        return "16-mixed"
    return "bf16-mixed" if accelerator.native_amp else "32-true"


def refuse_unless(accelerator, precision: str, device: str) -> None:
    """Refuse unless the Accelerator runs what `precision` asks of it: its autocast and scaler
    at a mixed rung, neither at 32-true or a true rung (the arm casts the model itself)."""
    ran = runs(accelerator)
    if ran != (precision if precision.endswith("-mixed") else "32-true"):
        raise Unavailable(
            f"Accelerate would run {ran} for {precision} on {device} "
            f"(native_amp {accelerator.native_amp}, GradScaler "
            f"{'yes' if accelerator.scaler is not None else 'none'}); refusing to "
            f"record the wrong one"
        )


def refuse_sharding(cfg, device) -> None:
    """--strategy fsdp where Accelerate cannot give it, refused in every process (torchrun's
    ranks too): never a DDP or single-process run recorded as sharded."""
    if cfg.strategy != "fsdp":
        return
    if device.type == "cpu":
        why = "Accelerate never turns FSDP on for a CPU; use --strategy ddp"
    elif cfg.devices * cfg.num_nodes == 1 and not ranks.launched():
        why = (
            "Accelerate turns FSDP on only in a job of several processes; on one device "
            "start it with torchrun --nproc-per-node 1"
        )
    elif cfg.precision == "bf16-fsdp":
        why = (
            "at bf16-fsdp: its plugin gives every module one MixedPrecisionPolicy, "
            "BatchNorm included, where this rung keeps norm layers fp32; use bf16-mixed"
        )
    else:
        return
    raise Unavailable(f"accelerate: --strategy fsdp: {why}, or plain, lightning or fabric")


def refuse_unless_sharding(accelerator) -> None:
    """Read back that the Accelerator turned FSDP2 on: it does only in a job it sees as
    several processes on an accelerator (one GPU: torchrun --nproc-per-node 1), and a run
    recorded as sharded must be one."""
    if not accelerator.is_fsdp2:
        raise Unavailable(
            f"accelerate: --strategy fsdp: Accelerate did not turn FSDP2 on (it runs "
            f"{accelerator.distributed_type.value}); on one device start it with torchrun "
            f"--nproc-per-node 1"
        )


def check(cfg) -> None:
    """Before anything runs: build the Accelerator this run would build and refuse now."""
    from accelerate import Accelerator

    from common.device import resolve_device
    from common.precision import resolve

    cfg.validate()
    device = resolve_device(cfg)
    refuse_sharding(cfg, device)
    policy, _ = resolve(cfg.precision, device)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=MIXED[policy.effective])
    refuse_unless(accelerator, policy.effective, device.type)
