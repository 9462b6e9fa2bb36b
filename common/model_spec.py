"""Which network `--model` names, and whether it can train on CIFAR-10 here, said before
anything runs.

    resnet18, small, linear      ours (common/models.py)
    torchvision:NAME             torchvision.models.get_model(NAME, num_classes=10,
                                 weights=None)
    timm:NAME                    timm.create_model(NAME, num_classes=10, pretrained=False)
    package.module:callable      a callable returning an nn.Module, from the working folder or
                                 the environment

Every arm builds the model the same way, through build_model() below: under the run's
seed, on the CPU, before any framework wraps it, so that the initial weights are the same. What
cannot work is one line (UsageError): a spec that names nothing, a module that does not import
(its error's last line), a callable that returns something else, a model whose forward of two
32x32 images does not give [2, 10] logits, or one that needs larger inputs (the smallest size
it takes is named). Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import os
import random
import re
import sys
import threading
import traceback
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from common import models
from common.errors import UsageError

OURS = ("resnet18", "small", "linear")
PREFIXES = ("torchvision", "timm")
CLASSES = 10
SIZE = 32
# Square sizes tried, in order, to name the smallest input a model takes.
PROBE = (32, 48, 64, 80, 96, 128, 160, 192, 224, 256, 299, 384, 448, 518)
IMPORT_PATH = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*")


# This tool's own top-level packages: a module of the user's named like one is hidden by it.
OWN = (
    "ampcompare",
    "common",
    "plain_torch",
    "lightning_impl",
    "fabric_impl",
    "accelerate_impl",
    "apex_impl",
)


class _Ended(BaseException):
    """os._exit called by a model's code, turned into an exception while it runs here."""

    def __init__(self, code):
        super().__init__(code)
        self.code = code


@contextlib.contextmanager
def guarded(where: str, doing: str):
    """Run a model's own code (its import, its build, its forward) so that ending the process
    — sys.exit, exit(), os._exit — is a usage error naming the spec, never a silent exit
    with nothing run; torchvision's FutureWarnings about its own defaults are not printed."""
    with _PATCH:  # threads (the bench's arms) build at once: patched while any one builds
        _PATCH.depth += 1
        os._exit = _refuse
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torchvision\.")
            yield
    except (SystemExit, _Ended) as e:
        how = "os._exit" if isinstance(e, _Ended) else "sys.exit"
        raise UsageError(
            f"{where}: {doing} ended the process ({how}({e.code!r})); a model must not exit"
        ) from None
    finally:
        with _PATCH:
            _PATCH.depth -= 1
            if not _PATCH.depth:
                os._exit = _REAL_EXIT


class _Patch:
    """How many threads are inside guarded(), under a lock."""

    def __init__(self):
        self.lock, self.depth = threading.Lock(), 0

    def __enter__(self):
        self.lock.acquire()

    def __exit__(self, *exc):
        self.lock.release()


_REAL_EXIT = os._exit
_PATCH = _Patch()


def _refuse(code=0):
    raise _Ended(code)


@contextlib.contextmanager
def seeded(seed: int):
    """Every global generator a model's code may draw from — torch's, Python's random,
    numpy's — seeded with the run's seed, as Lightning's seed_everything does, and restored
    afterwards: the same initial weights in every arm, whichever a model uses."""
    state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(state)
            np.random.set_state(np_state)


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


def build_model(cfg) -> nn.Module:
    """Same seed, same initial weights, whichever implementation asks: ours, torchvision's,
    timm's or the user's own, on the CPU, with torch's, Python's and numpy's global generators
    seeded. They are left as they were (a resumed run has just restored them)."""
    make = builder(parse(cfg.model))
    with seeded(cfg.seed), guarded(f"--model {cfg.model}", "building it"):
        return make()


def builder(spec: Spec) -> Callable:
    """A function of no arguments that builds the model; UsageError when it cannot exist."""
    where = f"--model {spec.text}"
    if spec.kind == "ours":
        return models.MODELS[spec.name]
    if spec.kind == "torchvision":
        from torchvision import models as tv  # where used, as in common/data.py

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
            raise UsageError(f"{where}: {module_name} has no {attr}{_hidden(module, where)}")
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
        with guarded(where, f"importing {name}"):
            return importlib.import_module(name)
    except UsageError:
        raise
    except Exception as e:  # whatever the module's own code raised
        raise UsageError(f"{where}: cannot import {name} ({last_line(e)})") from None


def last_line(e: BaseException) -> str:
    """An exception as one line: its type and message, newlines folded."""
    return " ".join(traceback.format_exception_only(type(e), e)[-1].split())


def _hidden(module, where: str) -> str:
    """Where the module named came from, when a file of the user's with that name in the
    working folder was passed over for it (this tool's own package, or the standard
    library's, is found first)."""
    top = module.__name__.split(".")[0]
    mine = [p for p in (f"{top}.py", top) if os.path.exists(os.path.join(os.getcwd(), p))]
    found = getattr(module, "__file__", None) or "built in"
    if not mine or (found != "built in" and os.path.dirname(found) == os.getcwd()):
        return ""
    whose = (
        "this tool's own package"
        if top in OWN
        else "a module of Python's or of the environment"
    )
    return (
        f" (the {top} imported is {whose}, from {found}, not ./{mine[0]}: rename yours, "
        f"e.g. my_{top})"
    )


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
    spec = parse(text)
    make = builder(spec)
    where = f"--model {text}"
    with seeded(seed):
        try:
            with guarded(where, "building it"):
                model = make()
        except UsageError:
            raise
        except Exception as e:
            raise UsageError(f"{where}: building it failed ({last_line(e)})") from None
        if not isinstance(model, nn.Module):
            raise UsageError(
                f"{where}: it returned {type(model).__name__}, not a torch.nn.Module"
            )
        if not any(p.requires_grad for p in model.parameters()):
            raise UsageError(f"{where}: it has no parameters to train")
        with guarded(where, "its forward"):
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
        with guarded(where, "its forward"):
            dtype = _forward(model, SIZE, dtype=True)[0]
        if not dtype.is_floating_point:
            raise UsageError(
                f"{where}: its forward gave {dtype} outputs, not floating-point logits"
            )
    checked = Checked(text, sum(p.numel() for p in model.parameters()))
    if spec.kind == "import":
        module = sys.modules[spec.name.partition(":")[0]]
        files = source_files(module, inspect.getmodule(make) or module)
        if files:
            checked.source = files[0]
            checked.source_sha256 = sources_sha256(files)
    return checked


def source_files(*modules) -> list[str]:
    """The source files a model's code lives in: the modules named (the one given in --model,
    the one that defines the callable) first, then every module loaded from the same package
    (or, for a module outside a package, from the same folder), this tool's own left out."""
    first, roots = [], set()
    for m in modules:
        path = _source(m)
        if path is None:
            continue
        first.append(path)
        top = sys.modules.get(m.__name__.split(".")[0])
        root = _source(top) if top is not None and top is not m else None
        package = root and os.path.basename(root) == "__init__.py"
        roots.add((os.path.dirname(root if package else path), bool(package)))
    more = set()
    for name, m in list(sys.modules.items()):
        path = _source(m)
        if path is None or name.split(".")[0] in OWN:
            continue
        for folder, package in roots:
            inside = path.startswith(folder + os.sep)
            if inside and (package or os.path.dirname(path) == folder):
                more.add(path)
    return list(dict.fromkeys(first)) + sorted(more - set(first))


def _source(module) -> Optional[str]:
    """A module's Python source file, or None (a built-in or compiled module)."""
    path = getattr(module, "__file__", None)
    if not isinstance(path, str) or not path.endswith(".py"):
        return None
    path = os.path.abspath(path)
    return path if os.path.isfile(path) else None


def sources_sha256(files: list[str]) -> str:
    """One SHA-256 over the files' names and bytes: a change in any of them changes it."""
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            h.update(f"{os.path.basename(path)}|".encode() + hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def _forward(model, size: int, training: bool = False, dtype: bool = False):
    """(output shape, or with `dtype` its dtype, None), or (None, the error's last line), of a
    forward of 2 images (the model checked is thrown away: a training-mode forward may change
    its state)."""
    was = model.training
    model.train(training)
    try:
        with torch.inference_mode():
            out = model(torch.randn(2, 3, size, size))
        if not isinstance(out, torch.Tensor):
            return type(out).__name__, None
        return (out.dtype if dtype else list(out.shape)), None
    except Exception as e:
        return None, last_line(e)
    finally:
        model.train(was)
