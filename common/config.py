"""The one source of defaults. Every CLI option takes its default and help from a field here.

The defaults reproduce the reference benchmark (Lightning precision 16 vs 32 on CIFAR-10):
batch 256, Adam at lr 1e-4, 10 epochs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from common import model_spec
from common.errors import UsageError
from common.precision import OPT_LEVELS, SHARDED_ONLY, canonical

DATASETS = ("cifar10", "synthetic")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine")
ACCELERATORS = ("auto", "cpu", "cuda")
STRATEGIES = ("ddp", "fsdp")
ROLES = ("arm", "control")
INT_MAX = 2**31 - 1  # the largest value any integer option takes, unless it says less
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}")


# How an option behaves when a stopped run is resumed.
SAME = "same"  # it must be the stopped run's: it changes what is computed
FREE = "free"  # it may differ: it changes nothing that is computed
FOLDER = "folder"  # it comes from the folder being resumed
RAISED = "raised"  # it may only be raised (--epochs)


def option(default, help, common=True, resume=SAME, per_arm=False, setting=True, **click):
    """A field of Config and its CLI option, declared once: the help and click settings, and
    what the tool does with it. common: every command takes it (else only those that add it
    by name). resume: SAME, FREE, FOLDER or RAISED. per_arm: compare sets it for each arm
    itself (never passes the comparison's own). setting: runs that differ in it are different
    settings in a report (False: it names a run, or is an axis of the report's tables)."""
    return field(
        default=default,
        metadata={
            "help": help,
            "click": click,
            "common": common,
            "resume": resume,
            "per_arm": per_arm,
            "setting": setting,
        },
    )


def names(**flags) -> tuple:
    """The options whose declaration has every flag given (resume=FREE, setting=False, ...),
    looked up on Config as it is now (a test may extend it)."""
    return tuple(
        f.name
        for f in dataclasses.fields(Config)
        if all(
            f.metadata.get(k) in (v if isinstance(v, tuple) else (v,)) for k, v in flags.items()
        )
    )


@dataclass
class Config:
    dataset: str = option(
        "cifar10",
        "Training data: the real CIFAR-10, or a seeded CIFAR-shaped "
        "synthetic set that needs no download.",
        choices=DATASETS,
    )
    data_dir: str = option(
        "./data", "Where CIFAR-10 is read from, or downloaded to.", resume=FREE, setting=False
    )
    download: bool = option(
        True,
        "Download CIFAR-10 into --data-dir when it is not there.",
        flag="--download/--no-download",
        resume=FREE,
        setting=False,
    )
    # 10^6 training images (and 2 x 10^5 test images) are 3.4 GiB of uint8, and the loaders'
    # padded pair 10.7 GiB more (data.describe_memory); nothing bigger is made on the way.
    synthetic_size: int = option(
        10000,
        "Training images in the synthetic dataset (test: a fifth of it).",
        min=1,
        max=10**6,
    )
    model: str = option(
        "resnet18",
        "resnet18 (CIFAR variant), small (a fast CNN for CPU runs), "
        "linear (next to no compute: shows a framework's own cost per step), "
        "torchvision:NAME, timm:NAME (num_classes 10, no pretrained weights) or "
        "package.module:callable (your own nn.Module: [B, 3, 32, 32] -> [B, 10]).",
    )
    precision: str = option(
        "auto",
        "32-true, 16-mixed, bf16-mixed (aliases 32, 16, bf16), bf16-true, 16-true (the model "
        "itself in the half type, no fp32 copy), bf16-fsdp (with --strategy fsdp: FSDP's own "
        "MixedPrecisionPolicy), or auto: 16-mixed on CUDA, bf16-mixed on CPU.",
        per_arm=True,
        setting=False,
    )
    batch_size: int = option(256, "Images per optimizer step.", min=1, max=65536)
    # The optimizers hold it as float32 (largest 3.4e38): 1e30 already diverges at once.
    lr: float = option(1e-4, "Learning rate.", min=0.0, min_open=True, max=1e30)
    optimizer: str = option("adam", "Optimizer (sgd uses momentum 0.9).", choices=OPTIMIZERS)
    schedule: str = option(
        "constant",
        "Learning-rate schedule, stepped once per optimizer step.",
        choices=SCHEDULES,
    )
    clip_grad: float = option(
        0.0, "Clip the gradient norm to this value (0: no clipping).", min=0.0, max=1e30
    )
    epochs: int = option(10, "Training epochs.", min=1, max=100_000, resume=RAISED)
    seed: int = option(
        0, "Seed for weights, data order and augmentation.", min=0, per_arm=True, setting=False
    )
    repeat: int = option(
        0,
        "Index of this run among repeats of the same settings (compare sets it; "
        "recorded, changes nothing).",
        min=0,
        max=100_000,
        per_arm=True,
        setting=False,
    )
    role: str = option(
        "arm",
        "What compare runs this as: an arm, or the plain loop once more as the comparison's "
        "control, its noise floor (compare sets it; recorded, changes nothing).",
        choices=ROLES,
        per_arm=True,
        setting=False,
    )
    position: Optional[int] = option(
        None,
        "Place of this run in its repeat's order (compare sets it; recorded, changes nothing).",
        min=0,
        max=100_000,
        type=int,
        shown="none",
        per_arm=True,
        setting=False,
    )
    accelerator: str = option(
        "auto", "Device: cuda when available under auto.", choices=ACCELERATORS
    )
    devices: int = option(
        1,
        "Processes (one per GPU on CUDA) per node, with DDP when more than "
        "one; --batch-size is split between them.",
        min=1,
        max=64,
    )
    num_nodes: int = option(
        1,
        "Nodes (machines) of the job: run the same command under torchrun "
        "on each (docs/devices.md).",
        min=1,
        max=1024,
    )
    strategy: str = option(
        "ddp",
        "How several processes share the model: ddp (a whole copy on each, gradients "
        "all-reduced) or fsdp (torch's fully_shard: parameters, gradients and optimizer "
        "state sharded over the processes; docs/fsdp.md).",
        choices=STRATEGIES,
    )
    deterministic: bool = option(
        False,
        "Use deterministic algorithms only (slower on CUDA).",
        flag="--deterministic/--no-deterministic",
    )
    tf32: bool = option(
        False,
        "Allow TF32 in fp32 convolutions and matmuls (Ampere and newer).",
        flag="--tf32/--no-tf32",
    )
    channels_last: Optional[bool] = option(
        None,
        "Keep the model and images in channels-last (NHWC) memory format.",
        shown="on with CUDA, off on CPU and under --strategy fsdp",
        flag="--channels-last/--no-channels-last",
    )
    compile: bool = option(
        False,
        "torch.compile the model, the same way in every arm.",
        flag="--compile/--no-compile",
    )
    num_workers: int = option(
        0,
        "Data loader worker processes on a CPU (augmentation is batched "
        "tensor ops; with CUDA it runs on the GPU, without workers).",
        min=0,
        max=64,
        resume=FREE,
    )
    limit_train_batches: Optional[int] = option(
        None, "Train on at most this many batches per epoch.", min=1, type=int, shown="all"
    )
    limit_test_batches: Optional[int] = option(
        None, "Evaluate on at most this many batches per epoch.", min=1, type=int, shown="all"
    )
    out_dir: str = option(
        "./runs",
        "Each run writes <out-dir>/<run-id>/result.json.",
        resume=FOLDER,
        per_arm=True,
        setting=False,
    )
    run_id: Optional[str] = option(
        None,
        "Name of the run folder.",
        shown="<time>-<impl>-<precision>-<6 random hex digits>",
        resume=FOLDER,
        per_arm=True,
        setting=False,
    )
    quiet: bool = option(
        False,
        "No progress bar.",
        flag="--quiet/--no-quiet",
        resume=FREE,
        per_arm=True,
        setting=False,
    )
    checkpoint: bool = option(
        True,
        "Save a checkpoint (model, optimizer, scheduler, loss-scaler "
        "state, measurements) beside result.json at the end of every epoch, "
        "so that --resume can continue the run.",
        flag="--checkpoint/--no-checkpoint",
        setting=False,
    )
    keep_checkpoint: bool = option(
        True,
        "Keep the checkpoint once the run has ended ok (compare "
        "keeps none: a ResNet-18 with Adam state is 128 MiB a run).",
        flag="--keep-checkpoint/--no-keep-checkpoint",
        per_arm=True,
        setting=False,
    )
    resume: Optional[str] = option(
        None,
        "Continue the stopped run in this folder (compare: the "
        "stopped comparison); the other options must be the stopped "
        "run's, but a run's --epochs may be raised (a comparison's may not).",
        shown="none: a new run",
        resume=FOLDER,
        per_arm=True,
        setting=False,
    )
    opt_level: Optional[str] = option(
        None,
        "apex opt level.",
        common=False,
        choices=tuple(OPT_LEVELS),
        shown="O0 for 32-true, O1 for 16-mixed, O3 for 16-true",
        per_arm=True,
        setting=False,
    )

    def validate(self) -> "Config":
        """Check every option, alone and together; make paths absolute (a child process started
        elsewhere, or a later --resume, must find the same folders). Raises UsageError naming
        the option."""
        self.each_checked()
        if self.strategy == "fsdp" and self.channels_last:
            raise UsageError(
                "--channels-last with --strategy fsdp: FSDP2 shards only contiguous "
                "parameters, and channels-last convolution weights are not; drop one"
            )
        if self.precision in SHARDED_ONLY and self.strategy != "fsdp":
            raise UsageError(
                f"--precision {self.precision} is FSDP's own mixed precision (its "
                f"MixedPrecisionPolicy): it needs --strategy fsdp"
            )
        if self.resume is not None and not os.path.isdir(self.resume):
            raise UsageError(f"--resume {self.resume}: no such folder")
        world = self.devices * self.num_nodes
        if self.batch_size % world:
            raise UsageError(
                f"--batch-size {self.batch_size} does not split evenly over "
                f"{world} processes; use a multiple of {world}"
            )
        return self

    def each_checked(self) -> "Config":
        """Check each option on its own, in the form it is recorded in: the precision's
        canonical name, absolute paths (validate() then checks them together)."""
        for f in dataclasses.fields(self):
            _check(f, getattr(self, f.name))
        self.precision = canonical(self.precision)
        model_spec.parse(self.model)  # its form only: the model is checked before a run
        for name in ("data_dir", "out_dir", "resume"):
            value = getattr(self, name)
            if value is not None:
                if not value.strip() or "\0" in value:
                    raise UsageError(f"{option_flag(name)} must name a folder, not {value!r}")
                setattr(self, name, os.path.abspath(os.path.expanduser(value)))
        if self.run_id is not None and not RUN_ID.fullmatch(self.run_id):
            raise UsageError(
                f"--run-id {self.run_id!r}: use a plain folder name (letters, "
                f"digits and . _ + -, starting with a letter or digit, at most 200)"
            )
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def option_flag(name: str) -> str:
    """The command-line spelling of a Config field: --data-dir for data_dir."""
    return "--" + name.replace("_", "-")


def as_args(name: str, value) -> list[str]:
    """An option and its value as command-line arguments: ["--lr", "0.5"], or for a flag its
    "--on/--off" spelling as the CLI declares it: ["--no-channels-last"]."""
    if isinstance(value, bool):
        field = next(f for f in dataclasses.fields(Config) if f.name == name)
        on, off = field.metadata["click"]["flag"].split("/")
        return [on if value else off]
    return [option_flag(name), str(value)]


def spelled(name: str, value) -> str:
    """as_args in words; "default" for an option that was not given."""
    return "default" if value is None else " ".join(as_args(name, value))


def _kind(f: dataclasses.Field) -> type:
    spec = f.metadata.get("click", {})
    if "flag" in spec:
        return bool
    return spec.get("type") or (type(f.default) if f.default is not None else str)


def _check(f: dataclasses.Field, value) -> None:
    spec, name, kind = f.metadata.get("click", {}), option_flag(f.name), _kind(f)
    if value is None:
        return
    # From the command line click has made the types right; a Config built from a stored
    # file (a resume, a comparison's plan) may hold anything.
    fits = (
        isinstance(value, bool)
        if kind is bool
        else isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is float
        else isinstance(value, int) and not isinstance(value, bool)
        if kind is int
        else isinstance(value, str)
    )
    if not fits:
        raise UsageError(
            f"{name} must be {'a' if kind is not int else 'an'} {kind.__name__}, not {value!r}"
        )
    if isinstance(value, bool):
        return
    if "choices" in spec and value not in spec["choices"]:
        raise UsageError(f"{name} must be one of {', '.join(spec['choices'])}, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, not {value}")
    if isinstance(value, (int, float)):
        low, open_ = spec.get("min"), spec.get("min_open", False)
        high = spec.get("max", INT_MAX if isinstance(value, int) else None)
        if low is not None and (value < low or (open_ and value == low)):
            raise UsageError(f"{name} must be {'>' if open_ else '>='} {low}, not {value}")
        if high is not None and value > high:
            raise UsageError(f"{name} must be <= {high}, not {value}")
