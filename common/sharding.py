"""Sharded data parallel (--strategy fsdp): torch's FSDP2, `fully_shard`. Which modules are
sharded as one unit, the mixed-precision policy each gets, and the model's full weights
gathered back. Every arm that shards applies exactly this (plain calls it, Lightning from
configure_model, Fabric as its parallelize_fn), so that their arithmetic is the same.

Units: each block of the model, then the root, which holds what no block does. A block is a
module whose class name ends in Block or Bottleneck: our ResNet-18's residual blocks and our
small CNN's conv blocks, torchvision's ResNet blocks, timm's residual and transformer blocks.
A model without such modules (our linear probe, a user's that names its blocks otherwise) is
one unit, the root: still sharded, its whole parameters gathered at once.

Precision (docs/fsdp.md): a mixed rung's autocast runs over fp32 shards, as under DDP; a true
rung's model is cast before it is sharded, so its shards are in the half type; bf16-fsdp is
FSDP's own mixed precision, MixedPrecisionPolicy(param_dtype=bf16): fp32 shards and optimizer
state, each unit's parameters gathered in bf16 and whole modules computing in it. Gradients
are reduced in fp32 at every rung: the policy's default changed between torch versions, and
gloo lacks some bf16 collectives (pytorch#111131).

BatchNorm under bf16-fsdp: each norm layer is a unit of its own that keeps fp32 parameters (a
policy without param_dtype, its output cast to bf16 for the next layer), as torch's own FSDP2
tests do, so that its running statistics stay fp32 beside its fp32 weights; the CPU and CUDA
kernels take bf16 inputs with fp32 parameters.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from common.errors import UsageError

# torch.distributed's FSDP and DTensor are imported inside the functions that use them: at the
# top they would lengthen every process's start-up, sharded or not.
BLOCKS = ("Block", "Bottleneck")  # the class-name endings of a sharding unit


def units(model: nn.Module) -> list[nn.Module]:
    """The model's blocks, innermost first (a block inside another is sharded before it)."""
    blocks = [m for m in model.modules() if m is not model and is_unit(m)]
    return blocks[::-1]


def unit_classes(model: nn.Module) -> list[str]:
    """The class names of the model's blocks: what a framework that picks its units by class
    name (Accelerate's transformer_cls_names_to_wrap) is given."""
    return sorted({type(m).__name__ for m in units(model)})


def is_unit(module: nn.Module) -> bool:
    """Whether a module is a block (its own sharding unit)."""
    return type(module).__name__.endswith(BLOCKS)


def policy(param_dtype):
    """FSDP2's MixedPrecisionPolicy: parameters gathered in param_dtype (None: as stored), the
    gradients reduced in fp32, pinned."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def shard(model: nn.Module, mesh, param_dtype=None) -> nn.Module:
    """fully_shard on each unit, then on the root, over `mesh` (a 1-D data-parallel mesh).
    In place; returns the model. The optimizer must be built after this: the parameters are
    new (DTensor shards)."""
    from torch.distributed.fsdp import fully_shard

    norms = [m for m in model.modules() if isinstance(m, _NormBase)] if param_dtype else []
    refuse_shared_parameters(model)
    for norm in norms[::-1]:
        fully_shard(norm, mesh=mesh, mp_policy=_fp32_norm(param_dtype))
    for unit in [*units(model), model]:
        fully_shard(unit, mesh=mesh, mp_policy=policy(param_dtype))
    return model


def refuse_shared_parameters(model: nn.Module) -> None:
    """A parameter that two blocks share (tied weights), neither inside the other, cannot be
    sharded with both: FSDP would fail at the first forward. Said in one line, before."""
    holders = {}  # a parameter's id -> the blocks that hold it
    for block in units(model):
        for p in block.parameters():
            holders.setdefault(id(p), []).append(block)
    for name, p in model.named_parameters():
        blocks = holders.get(id(p), [])
        for i, a in enumerate(blocks):
            for b in blocks[i + 1 :]:
                if not (_inside(a, b) or _inside(b, a)):
                    raise UsageError(
                        f"--strategy fsdp: parameter {name} is shared by two blocks "
                        f"({type(a).__name__} and {type(b).__name__}), which FSDP shards "
                        f"apart; untie it, or use --strategy ddp"
                    )


def _inside(inner: nn.Module, outer: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def _fp32_norm(param_dtype):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(output_dtype=param_dtype, reduce_dtype=torch.float32)


def full_state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts, whole, as one process would have them: gathered onto
    rank 0's CPU (the other ranks get empty dicts). A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def load_full_state(model: nn.Module, optimizer, weights: dict, moments: dict) -> None:
    """full_state's dicts back into a sharded model and its optimizer: each rank takes its
    own shards out of the whole."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model,
        optimizer,
        model_state_dict=weights,
        optim_state_dict=moments,
        options=StateDictOptions(full_state_dict=True),
    )


def _dtensor() -> type:
    """DTensor's class; or, where nothing has imported it, a class no tensor is an instance
    of (then no tensor is a shard, and the import's cost is spared)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", _NoShard)


class _NoShard:
    pass


def is_sharded(model: nn.Module) -> bool:
    """Whether fully_shard has been applied to the model or a module in it. Not read from the
    parameters: after a forward without backward (an evaluation) the root's stay gathered,
    plain tensors, until FSDP reshards them; every rank must still gather alike."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing is sharded
    return fsdp is not None and any(isinstance(m, fsdp.FSDPModule) for m in model.modules())


def full_state_dict(model: nn.Module) -> dict:
    """The model's state_dict, every shard gathered into its full tensor. A collective when
    the model is sharded: every rank calls it, and every rank gets the whole."""
    shard = _dtensor()
    return {
        k: v.full_tensor() if isinstance(v, shard) else v for k, v in model.state_dict().items()
    }


def local(t):
    """A DTensor's own shard on this rank; anything else itself."""
    return t.to_local() if isinstance(t, _dtensor()) else t
