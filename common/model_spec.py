"""Which network `--model` names, and whether it can train on CIFAR-10 here, said before
anything runs.

    resnet18, small, linear      ours (common/models.py)
    torchvision:NAME             torchvision.models.get_model(NAME, num_classes=10,
                                 weights=None)
    timm:NAME                    timm.create_model(NAME, num_classes=10, pretrained=False)
    package.module:callable      a callable returning an nn.Module, from the working folder or
                                 the environment

Every arm builds the model the same way, through build() in common/models.py: under the run's
seed, on the CPU, before any framework wraps it, so that the initial weights are the same. What
cannot work is one line (UsageError): a spec that names nothing, a module that does not import
(its error's last line), a callable that returns something else, a model whose forward of two
32x32 images does not give [2, 10] logits, or one that needs larger inputs (the smallest size
it takes is named). Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import re
import sys
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

from common.errors import UsageError

OURS = ("resnet18", "small", "linear")
PREFIXES = ("torchvision", "timm")
CLASSES = 10
SIZE = 32
# Square sizes tried, in order, to name the smallest input a model takes.
PROBE = (32, 48, 64, 80, 96, 128, 160, 192, 224, 256, 299, 384, 448, 518)
IMPORT_PATH = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*")


@dataclass(frozen=True)
class Spec:
    text: str  # as given
    kind: str  # "ours", "torchvision", "timm" or "import"
    name: str  # the model's name, or "module:callable"


def parse(text: str) -> Spec:
    """The spec's form; UsageError for one that has none (no import happens here)."""
    where = f"--model {text!r}"
    if text in OURS:
        return Spec(text, "ours", text)
    prefix, colon, name = text.partition(":")
    if colon and prefix in PREFIXES:
        if not re.fullmatch(r"[\w.\-]+", name):
            raise UsageError(
                f"{where}: name a {prefix} model after the colon, e.g. "
                f"{prefix}:{'resnet50' if prefix == 'torchvision' else 'resnet18'}"
            )
        return Spec(text, prefix, name)
    if IMPORT_PATH.fullmatch(text):
        return Spec(text, "import", text)
    raise UsageError(
        f"{where}: not one of {', '.join(OURS)}, and not torchvision:NAME, "
        f"timm:NAME or package.module:callable"
    )


def builder(spec: Spec) -> Callable:
    """A function of no arguments that builds the model; UsageError when it cannot exist."""
    where = f"--model {spec.text}"
    if spec.kind == "ours":
        from common import models

        return models.MODELS[spec.name]
    if spec.kind == "torchvision":
        from torchvision import models as tv

        if spec.name not in tv.list_models(module=tv):
            raise UsageError(
                f"{where}: torchvision has no classification model {spec.name!r} "
                f"(torchvision.models.list_models() names them)"
            )
        smallest = _torchvision_min_size(spec.name)
        if smallest and (smallest[0] > SIZE or smallest[1] > SIZE):
            raise UsageError(
                f"{where}: needs inputs of at least {smallest[0]}x{smallest[1]} "
                f"(torchvision's min_size); CIFAR-10's are {SIZE}x{SIZE}"
            )
        return lambda: tv.get_model(spec.name, num_classes=CLASSES, weights=None)
    if spec.kind == "timm":
        try:
            import timm
        except ImportError:
            raise UsageError(
                f"{where}: timm is not installed; pip install .[timm] (or pip install timm)"
            ) from None
        if not timm.is_model(spec.name):
            raise UsageError(
                f"{where}: timm has no model {spec.name!r} (timm.list_models() names them)"
            )
        return lambda: timm.create_model(spec.name, num_classes=CLASSES, pretrained=False)
    module_name, _, attr = spec.name.partition(":")
    module = _import(module_name, where)
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UsageError(f"{where}: {module_name} has no {attr}")
        target = getattr(target, part)
    if not callable(target):
        raise UsageError(
            f"{where}: {attr} in {module_name} is a {type(target).__name__}, not "
            f"a callable that returns a model"
        )
    return target


def _torchvision_min_size(name: str):
    """The smallest input torchvision says the model takes (its weights' meta), or None."""
    from torchvision import models as tv

    try:
        return next(iter(tv.get_model_weights(name))).meta.get("min_size")
    except (ValueError, StopIteration, AttributeError):
        return None


def _import(name: str, where: str):
    """The module, from the environment or the working folder; UsageError with the error's
    last line when importing it fails."""
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # the working folder, after the environment
    try:
        return importlib.import_module(name)
    except Exception as e:  # whatever the module's own code raised
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        raise UsageError(f"{where}: cannot import {name} ({last})") from None


@dataclass
class Checked:
    """What the record keeps of the model: the spec, its size and, for an import path, the
    module's source file and its SHA-256 (do two records train the same code?)."""

    spec: str
    parameters: int
    source: Optional[str] = None
    source_sha256: Optional[str] = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def check(text: str, seed: int = 0) -> Checked:
    """Build the model once on the CPU and try it on two CIFAR-sized images; UsageError naming
    what is wrong. The global RNG and every model state are left as they were."""
    import torch
    from torch import nn

    spec = parse(text)
    make = builder(spec)
    where = f"--model {text}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = make()
        except Exception as e:
            last = traceback.format_exception_only(type(e), e)[-1].strip()
            raise UsageError(f"{where}: building it failed ({last})") from None
        if not isinstance(model, nn.Module):
            raise UsageError(
                f"{where}: it returned {type(model).__name__}, not a torch.nn.Module"
            )
        shape, error = _forward(model, SIZE)
        if error is None and shape == [2, CLASSES]:  # and in training, where some differ
            shape, error = _forward(model, SIZE, training=True)
        if error is not None:
            smallest = next((s for s in PROBE[1:] if _forward(model, s)[1] is None), None)
            takes = (
                f"needs inputs of at least {smallest}x{smallest}"
                if smallest
                else f"does not run on {SIZE}x{SIZE} inputs or larger ones up to {PROBE[-1]}"
            )
            raise UsageError(
                f"{where}: {takes}; CIFAR-10's are {SIZE}x{SIZE} (its forward "
                f"of 2 images of {SIZE}x{SIZE}: {error})"
            )
        if shape != [2, CLASSES]:
            raise UsageError(
                f"{where}: a forward of a 2-image batch [2, 3, {SIZE}, {SIZE}] "
                f"gave {shape}, not [2, {CLASSES}] logits"
            )
    checked = Checked(text, sum(p.numel() for p in model.parameters()))
    if spec.kind == "import":
        source = inspect.getsourcefile(sys.modules[spec.name.partition(":")[0]])
        if source and os.path.isfile(source):
            with open(source, "rb") as f:
                checked.source = os.path.abspath(source)
                checked.source_sha256 = hashlib.sha256(f.read()).hexdigest()
    return checked


def _forward(model, size: int, training: bool = False):
    """(output shape, None), or (None, the error's last line), of a forward of 2 images (the
    model checked is thrown away: a training-mode forward may change its state)."""
    import torch

    was = model.training
    model.train(training)
    try:
        with torch.inference_mode():
            out = model(torch.randn(2, 3, size, size))
        return (list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__), None
    except Exception as e:
        return None, traceback.format_exception_only(type(e), e)[-1].strip()
    finally:
        model.train(was)
