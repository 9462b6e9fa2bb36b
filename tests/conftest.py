import hashlib
import json
import os
import pathlib
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest

from ampcompare import quiet
from common.config import Config

quiet.frameworks()  # as the command line does: the frameworks' banners are not the tests'
import pytorch_lightning  # noqa: E402,F401  (it sets its loggers' level as it is imported)

quiet.frameworks()

if os.environ.get("PYTEST_XDIST_WORKER"):
    # make test runs two workers on a 2-core machine: one thread each, and in every process they
    # start, instead of two each fighting over the cores (faster than both serial and two
    # threads a worker: docs/benchmark.md). Each test compares runs made at the same setting.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def tiny(tmp_path, **overrides) -> Config:
    """A config that trains in well under a second per epoch on a CPU. fp16 has no fast CPU
    kernels (docs/benchmark.md): 16-mixed and 16-true runs get 4 images a batch."""
    values = dict(
        dataset="synthetic",
        model="small",
        synthetic_size=256,
        batch_size=32,
        epochs=2,
        limit_train_batches=3,
        limit_test_batches=2,
        accelerator="cpu",
        precision="32-true",
        out_dir=str(tmp_path / "runs"),
        quiet=True,
    )
    values.update(overrides)
    if values["precision"] in ("16-mixed", "16", "16-true") and "batch_size" not in overrides:
        values["batch_size"] = 4
    return Config(**values)


# tiny()'s settings as command-line options (at 32-true): the same run from a CLI process.
TINY_ARGS = (
    "--dataset synthetic --model small --synthetic-size 256 --batch-size 32 "
    "--limit-train-batches 3 --limit-test-batches 2 --accelerator cpu --precision 32 --quiet"
).split()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_RUN = (
    "--dataset synthetic --model small --synthetic-size 256 --batch-size 64 --accelerator cpu"
).split()


# A comparison's arms alone, for a test about neither the control arm nor the warm-up run: each
# of those is one process more.
ARMS_ONLY = ["--no-control", "--no-warmup"]


# `ampcompare` as a user starts it: a fresh interpreter running the package, as the console
# script does (append its arguments).
AMPCOMPARE = [sys.executable, "-m", "ampcompare"]


def torch_functions() -> dict:
    """Every function torch, torch.Tensor and torch.nn.functional hold, by name: what apex's O1
    replaces with casting wrappers (and the RNN functions it shims)."""
    import torch
    import torch.nn.functional as F
    import torch.nn.modules.rnn as rnn

    held = {("rnn", "_VF"): rnn._VF}
    for space in (torch, torch.Tensor, F):
        held.update({(space.__name__, name): value for name, value in vars(space).items()})
    return held


def torch_changed(before: dict) -> list[str]:
    """The functions of torch_functions() that are no longer what `before` held."""
    now = torch_functions()
    return sorted(
        f"{space}.{name}"
        for (space, name), v in before.items()
        if now.get((space, name)) is not v
    )


@pytest.fixture(autouse=True)
def torch_left_as_found():
    """A test that leaves torch patched (apex O1 does, for the rest of a process) fails, instead
    of every later test in its process failing for a reason far from it."""
    before = torch_functions()
    yield
    changed = torch_changed(before)
    assert not changed, f"torch left patched after the test: {', '.join(changed[:5])}"


@pytest.fixture
def fresh_accelerate_state():
    """One Accelerate state per run, as a process of its own has it: a second Accelerator in
    one process may not change the mixed precision of the first."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def run_cli(args, cwd=ROOT, timeout=180) -> subprocess.CompletedProcess:
    """`ampcompare ARGS` as its own process, through the console entry's own code path."""
    return subprocess.run(
        [*AMPCOMPARE, *args],
        cwd=cwd,
        text=True,
        capture_output=True,
        timeout=timeout,
    )


def start_until_first_epoch(args, out_dir, pattern):
    """Start `ampcompare ARGS` as its own process; return it and the result.json matching
    `pattern` under out_dir once that run has finished an epoch."""
    proc = subprocess.Popen(
        [*AMPCOMPARE, *args],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 180  # it returns once the epoch is there: only a loaded
    # machine waits long (its first arm took over a minute under other jobs)
    while time.monotonic() < deadline:
        for path in out_dir.glob(pattern):
            if json.loads(path.read_text())["epochs"]:
                return proc, path
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no epoch finished: {proc.communicate()[1][-2000:]}")


def start_plain_compare(out_dir, epochs: int, args=SMALL_RUN):
    """start_until_first_epoch of a compare of the plain loop alone at 32-true: its process and
    its arm's result.json once the arm has finished an epoch."""
    return start_until_first_epoch(
        [
            "compare",
            *args,
            "--epochs",
            str(epochs),
            "--impls",
            "plain",
            "--precisions",
            "32",
            *ARMS_ONLY,  # what these tests are about: one arm, stopped and resumed
            "--out-dir",
            str(out_dir),
        ],
        out_dir,
        "*/plain-32-true-r0/result.json",
    )


def checkpoint_of(run_dir):
    """The checkpoint file the run's result.json names (checkpoint-<epochs>.pt)."""
    record = json.loads((pathlib.Path(run_dir) / "result.json").read_text())
    return pathlib.Path(run_dir) / record["checkpoint"]["file"]


# What a rung needs to train at all: 16-true with SGD (Adam's eps of 1e-8 is 0 in fp16, and a
# diverged run has no weights to compare: tests/test_ladder.py)
RUNG_OPTIONS = {"16-true": {"optimizer": "sgd", "lr": 0.05}}


def on_gpu(tmp_path, **overrides) -> Config:
    """A config for the gpu-marked tests: whole epochs of a small set, deterministic
    algorithms."""
    values = dict(
        accelerator="cuda",
        synthetic_size=2048,
        batch_size=128,
        limit_train_batches=None,
        limit_test_batches=None,
        deterministic=True,
    )
    values.update(overrides)
    return tiny(tmp_path, **values)


def write_cifar_archive(root, per_batch=10, seed=0):
    """CIFAR-10's own on-disk layout (cifar-10-batches-py: pickled dicts of uint8 rows), small.
    Returns {filename: md5} of what it wrote."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    md5 = {}
    for name in CIFAR_FILES:
        entry = {
            "batch_label": name,
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, per_batch).tolist(),
            "filenames": [f"{name}_{i}.png" for i in range(per_batch)],
        }
        _dump(os.path.join(folder, name), entry, md5)
    _dump(
        os.path.join(folder, "batches.meta"),
        {
            "label_names": [
                "airplane",
                "automobile",
                "bird",
                "cat",
                "deer",
                "dog",
                "frog",
                "horse",
                "ship",
                "truck",
            ],
            "num_cases_per_batch": per_batch,
            "num_vis": 3072,
        },
        md5,
    )
    return md5


def _dump(path, obj, md5):
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    with open(path, "rb") as f:
        md5[os.path.basename(path)] = hashlib.md5(f.read()).hexdigest()


@pytest.fixture
def cifar_archive(tmp_path, monkeypatch):
    """A small CIFAR-10 archive, with torchvision's expected checksums pointed at its files
    (torchvision checks every file against the official archive's md5s)."""
    from torchvision.datasets import CIFAR10

    root = tmp_path / "cifar"
    md5 = write_cifar_archive(str(root))
    monkeypatch.setattr(CIFAR10, "train_list", [[f, md5[f]] for f in CIFAR_FILES[:5]])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})
    return root


def _apex_amp_importable() -> bool:
    try:
        import apex.amp  # noqa: F401
    except Exception:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    import torch

    reasons = {}
    if not torch.cuda.is_available():
        reasons["gpu"] = "needs a CUDA GPU (none here)"
        reasons["apex"] = "apex.amp needs a CUDA GPU (none here)"
    if "apex" not in reasons and not _apex_amp_importable():
        reasons["apex"] = "needs NVIDIA apex 25.04 or older with apex.amp (not installed)"
    for item in items:
        for marker, reason in reasons.items():
            if item.get_closest_marker(marker):
                item.add_marker(pytest.mark.skip(reason=reason))
