"""What Lightning's Trainer and Fabric are given for precision and strategy: the same for both,
and ours, not the frameworks' (their defaults would not run what the other arms run). Each arm
passes its own framework's classes in, so this file imports neither framework.
"""

from __future__ import annotations

from common import distributed
from common.precision import Policy


def precision(policy: Policy, device_type: str, mixed_precision) -> tuple:
    """(precision, plugins) for Trainer(...) or Fabric(...). Both turn "16-mixed" into bf16 on
    a CPU unless they get their MixedPrecision plugin with a scaler."""
    if policy.framework == "16-mixed" and device_type == "cpu":
        import torch

        return None, [mixed_precision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]
    return policy.framework, []


def strategy(world: distributed.World, sharded: bool, ddp, model_parallel, **parallelize):
    """The strategy: ModelParallelStrategy (FSDP2, fully_shard over every rank; its checkpoint
    gathered into one file, as every arm's) under --strategy fsdp; DDPStrategy with the DDP
    settings every arm pins when there are several processes; "auto" for one. Both join the
    process group distributed.init made, on its backend and timeout. `parallelize`: Fabric's
    parallelize_fn (Lightning's Trainer calls the module's configure_model instead)."""
    group = {"process_group_backend": world.backend, "timeout": distributed.TIMEOUT}
    if sharded:
        return model_parallel(
            data_parallel_size=world.size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=False,
            **group,
            **parallelize,
        )
    if world.size > 1:
        return ddp(**group, **distributed.DDP_KWARGS)
    return "auto"
