"""Activation memory: the bytes autograd saves for backward during one training step.

Mixed precision halves activation memory, and that is measurable on any device, where a
process's peak RSS on a CPU is set by libraries and data instead. Every tensor the forward saves
passes through torch.autograd.graph.saved_tensors_hooks; each storage is counted once (views
share one), and the hook keeps no reference to a tensor, only its storage's address and size.
The bytes are split by kind:

    activations    floating-point tensors the backward needs: what mixed precision shrinks
    integer        integer tensors, e.g. max-pool indices (int64 at any precision)
    weight_copies  low-precision copies of the weights that autocast (or apex O1) makes
    (parameters saved as they are cost nothing extra and are not counted)

What it measured for our models is in docs/benchmark.md ("Activation memory").
"""

from __future__ import annotations

import torch

from common import sharding

KINDS = ("activations", "integer", "weight_copies")
VIEWS = {
    "TBackward0",
    "TransposeBackward0",
    "PermuteBackward0",
    "ViewBackward0",
    "UnsafeViewBackward0",
    "ExpandBackward0",
    "AsStridedBackward0",
    "SliceBackward0",
}


class SavedTensors:
    """A context manager around one forward: afterwards `.bytes` holds the bytes saved, by
    kind."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.sharded = model, sharding.is_sharded(model)
        self.params, self.param_storages = self._parameters()
        self.seen: set[int] = set()
        self.bytes = dict.fromkeys(KINDS, 0)
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def __enter__(self) -> "SavedTensors":
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self.hooks.__exit__(*exc)

    def _parameters(self) -> tuple[set, set]:
        """(ids, storage addresses) of the model's parameters as they are now. Under FSDP a
        unit's are gathered just before its forward and freed after it, so they are looked up
        again at each saved tensor."""
        params = list(self.model.parameters())
        storages = {sharding.local(p).untyped_storage().data_ptr() for p in params}
        return {id(p) for p in params}, storages

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        address = storage.data_ptr()
        if self.sharded:
            self.params, self.param_storages = self._parameters()
        if address not in self.seen and address not in self.param_storages:
            self.seen.add(address)
            self.bytes[self._kind(t)] += storage.nbytes()
        return t

    def _kind(self, t: torch.Tensor) -> str:
        if not (t.is_floating_point() or t.is_complex()):
            return "integer"
        # A cast of a parameter, maybe seen through a view (a Linear saves weight.t()): a copy
        # whose input accumulates into the parameter.
        fn = t.grad_fn
        while fn is not None and type(fn).__name__ in VIEWS and len(fn.next_functions) == 1:
            fn = fn.next_functions[0][0]
        inputs = fn.next_functions if fn is not None else ()
        source = getattr(inputs[0][0], "variable", None) if inputs and inputs[0][0] else None
        if type(fn).__name__ == "ToCopyBackward0" and id(source) in self.params:
            return "weight_copies"
        return "activations"


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def total(saved: dict) -> int:
    """Activation memory as the report shows it: what backward keeps beyond the weights."""
    return saved["activations"] + saved["integer"]
