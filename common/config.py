"""The one source of defaults. Every CLI option takes its default and help from a field here.

The defaults reproduce the reference benchmark (Lightning precision 16 vs 32 on CIFAR-10):
batch 256, Adam at lr 1e-4, 10 epochs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from common.errors import UsageError
from common.precision import canonical

DATASETS = ("cifar10", "synthetic")
MODELS = ("resnet18", "small")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine")
ACCELERATORS = ("auto", "cpu", "cuda")
OPT_LEVELS = ("O0", "O1", "O2", "O3")


def _f(default, help, common=True, **click):
    """A field with its CLI option: help, click settings, and whether every command takes it
    (common) or only the commands that add it by name."""
    return field(default=default, metadata={"help": help, "click": click, "common": common})


@dataclass
class Config:
    dataset: str = _f("cifar10", "Training data: the real CIFAR-10, or a seeded CIFAR-shaped "
                      "synthetic set that needs no download.", choices=DATASETS)
    data_dir: str = _f("./data", "Where CIFAR-10 is read from, or downloaded to.")
    download: bool = _f(True, "Download CIFAR-10 into --data-dir when it is not there.",
                        flag="--download/--no-download")
    synthetic_size: int = _f(10000, "Training images in the synthetic dataset (test: a fifth of it).",
                             min=1)
    model: str = _f("resnet18", "resnet18 (CIFAR variant) or small (a fast CNN for CPU runs).",
                    choices=MODELS)
    precision: str = _f("auto", "32-true, 16-mixed, bf16-mixed (aliases 32, 16, bf16), or auto: "
                        "16-mixed on CUDA, bf16-mixed on CPU.")
    batch_size: int = _f(256, "Images per optimizer step.", min=1)
    lr: float = _f(1e-4, "Learning rate.", min=0.0, min_open=True)
    optimizer: str = _f("adam", "Optimizer (sgd uses momentum 0.9).", choices=OPTIMIZERS)
    schedule: str = _f("constant", "Learning-rate schedule, stepped once per optimizer step.",
                       choices=SCHEDULES)
    clip_grad: float = _f(0.0, "Clip the gradient norm to this value (0: no clipping).", min=0.0)
    epochs: int = _f(10, "Training epochs.", min=1)
    seed: int = _f(0, "Seed for weights, data order and augmentation.")
    repeat: int = _f(0, "Index of this run among repeats of the same settings (compare sets it; "
                     "recorded, changes nothing).", min=0)
    accelerator: str = _f("auto", "Device: cuda when available under auto.", choices=ACCELERATORS)
    devices: int = _f(1, "Number of devices (only 1 is supported).", min=1)
    deterministic: bool = _f(False, "Use deterministic algorithms only (slower on CUDA).",
                             flag="--deterministic/--no-deterministic")
    tf32: bool = _f(False, "Allow TF32 in fp32 convolutions and matmuls (Ampere and newer).",
                    flag="--tf32/--no-tf32")
    num_workers: int = _f(0, "Data loader worker processes (augmentation is batched tensor ops).",
                          min=0)
    limit_train_batches: Optional[int] = _f(None, "Train on at most this many batches per epoch.",
                                            min=1, type=int, shown="all")
    limit_test_batches: Optional[int] = _f(None, "Evaluate on at most this many batches per "
                                           "epoch.", min=1, type=int, shown="all")
    out_dir: str = _f("./runs", "Each run writes <out-dir>/<run-id>/result.json.")
    run_id: Optional[str] = _f(None, "Name of the run folder.",
                               shown="<time>-<impl>-<precision>-<6 random hex digits>")
    quiet: bool = _f(False, "No progress bar.", flag="--quiet/--no-quiet")
    checkpoint: bool = _f(True, "Save checkpoint.pt (model, optimizer, loss-scaler state) beside "
                          "result.json at the end, also of a failed or interrupted run.",
                          flag="--checkpoint/--no-checkpoint")
    opt_level: Optional[str] = _f(None, "apex opt level.", common=False, choices=OPT_LEVELS,
                                  shown="O0 for 32-true, O1 for 16-mixed")

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            spec = f.metadata.get("click", {})
            value = getattr(self, f.name)
            if "choices" in spec and value is not None and value not in spec["choices"]:
                raise UsageError(f"--{_dash(f.name)} must be one of {', '.join(spec['choices'])}, "
                                 f"not {value!r}")
            if value is not None and "min" in spec:
                low, open_ = spec["min"], spec.get("min_open", False)
                if value < low or (open_ and value == low):
                    raise UsageError(f"--{_dash(f.name)} must be {'>' if open_ else '>='} {low}, "
                                     f"not {value}")
        self.precision = canonical(self.precision)  # recorded in canonical form
        if self.devices != 1:
            raise UsageError("--devices: only single-device runs are supported; use --devices 1")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _dash(name: str) -> str:
    return name.replace("_", "-")
