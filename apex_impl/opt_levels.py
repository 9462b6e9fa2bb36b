"""What apex needs and how our precision names map onto its opt levels.

apex.amp is deprecated and was removed from apex after release 25.04; apex is not on the
package index, and amp's loss scaler allocates CUDA tensors, so it cannot run without a GPU.
"apex is importable" and "apex can run here" are separate checks with separate messages.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import sys

import torch

from common.errors import Unavailable, UsageError
from common.device import resolve_device
from common.precision import OPT_LEVELS, Policy, canonical

RELEASE = "25.04"
INSTALL = (
    f"git clone --branch {RELEASE} https://github.com/NVIDIA/apex && "
    "pip install -v --disable-pip-version-check --no-cache-dir --no-build-isolation ./apex"
)
DEFAULT_OPT_LEVEL = {"32-true": "O0", "16-mixed": "O1", "16-true": "O3"}


def load_amp():
    """apex.amp, or Unavailable naming the missing piece and how to get a working apex."""
    try:
        importlib.import_module("apex")
    except ImportError:
        raise Unavailable(
            f"apex is not installed (it is not on the package index); apex.amp needs "
            f"NVIDIA apex {RELEASE} or older: {INSTALL}"
        ) from None
    try:
        return importlib.import_module("apex.amp")
    except ImportError:
        try:
            version = importlib.metadata.version("apex")
        except importlib.metadata.PackageNotFoundError:
            version = "this apex"
        raise Unavailable(
            f"apex {version} has no apex.amp (removed after release {RELEASE}); "
            f"install {RELEASE}: {INSTALL}"
        ) from None


def require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        why = (
            "none is available here"
            if not torch.cuda.is_available()
            else "--accelerator is cpu"
        )
        raise Unavailable(
            f"apex.amp needs a CUDA GPU (its loss scaler allocates CUDA tensors); "
            f"{why}. ampcompare plain, lightning, fabric and accelerate run on CPU"
        )


def resolve(precision: str, opt_level: str | None) -> tuple[str, Policy]:
    """(opt level, policy). --opt-level wins over an --precision of auto; an explicit precision
    that contradicts it, and bf16, are usage errors."""
    requested = canonical(precision)
    if requested.startswith("bf16"):
        raise Unavailable(
            "apex.amp has no bf16 mode (its opt levels are fp32 or fp16); use "
            "--precision 16-mixed, 16-true or 32-true, or ampcompare plain/lightning/fabric/"
            "accelerate "
            "for bf16"
        )
    if opt_level is None:
        # auto: apex runs on CUDA only, where the mixed precision is fp16.
        opt_level = DEFAULT_OPT_LEVEL["16-mixed" if requested == "auto" else requested]
    effective = OPT_LEVELS[opt_level]
    if requested not in ("auto", effective):
        raise UsageError(
            f"--opt-level {opt_level} runs {effective}, not --precision {requested}; "
            f"drop one of the two"
        )
    return opt_level, Policy(requested=requested, effective=effective)


def check(cfg) -> tuple[str, Policy]:
    """Everything apex needs, checked before anything runs: options first, then apex, then
    CUDA."""
    cfg.validate()
    device = resolve_device(cfg)
    if cfg.strategy == "fsdp":
        raise Unavailable(
            "apex: --strategy fsdp: apex.amp predates sharded data parallel (it wraps the "
            "whole model and optimizer itself); use --strategy ddp"
        )
    opt_level, policy = resolve(cfg.precision, cfg.opt_level)
    if cfg.resume and opt_level == "O2":
        # The checkpoint holds the model's fp16 weights; O2's fp32 master weights live only in
        # amp's optimizer wrapper, which rebuilds them from the fp16 ones on a resume.
        raise UsageError(
            "--resume: a run at --opt-level O2 cannot be continued exactly (its "
            "fp32 master weights are not in the checkpoint); start it again"
        )
    load_amp()
    require_cuda(device)
    return opt_level, policy


@contextlib.contextmanager
def torch_restored():
    """Undo O1's patches when the run ends, however it ends. O1's amp.initialize replaces some
    200 torch functions with casting wrappers for the rest of the process, and apex has no
    public way back: every later run in the same process (a test, the bench's next arm) would
    run through them and fail, or measure apex's casts in another arm."""
    rnn = sys.modules.get("torch.nn.modules.rnn")
    rnn_functions = getattr(rnn, "_VF", None)  # O1 puts a shim of its own there
    try:
        yield
    finally:
        state = getattr(sys.modules.get("apex.amp._amp_state"), "_amp_state", None)
        handle = getattr(state, "handle", None)
        if handle is not None:
            handle._deactivate()  # apex's own undo: puts back each function it saved
            del state.handle
            sys.modules["apex.amp.amp"]._DECORATOR_HANDLE = None
        if rnn is not None:
            rnn._VF = rnn_functions
