"""result.json: one run's record, written atomically after every epoch and at the end, so a
failed or interrupted run still leaves a complete, valid file with everything measured so far."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import statistics
import tempfile
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from common.environment import environment
from common.errors import UsageError
from common.metrics import Diverged, reset_peak_memory

SCHEMA = 2  # 2: repeat and seed are fields of their own
EXIT_CODES = {"ok": 0, "interrupted": 130}  # diverged, oom, failed: 1
OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass
class RunResult:
    schema: int
    run_id: str
    impl: str
    repeat: int
    seed: int
    status: str
    error: Optional[str]
    precision: dict
    opt_level: Optional[str]
    config: dict
    env: dict
    epochs: list = field(default_factory=list)
    step_losses: list = field(default_factory=list)
    weights_sha256: Optional[str] = None
    summary: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.status, 1)

    def to_dict(self) -> dict:
        return asdict(self)


def write_json(path: str, obj: Any) -> None:
    """Temp file + rename in the same folder: readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, allow_nan=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "result.json")) as f:
        return json.load(f)


def check_out_dir(out_dir: str) -> None:
    """Fail before anything is written if no run folder can be made under out_dir."""
    probe = os.path.abspath(out_dir)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--out-dir {out_dir}: {probe} is not a writable folder; choose another "
                         f"--out-dir")


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the state_dict: keys sorted, each tensor's contiguous CPU bytes in its own
    dtype (with name, dtype and shape, so a reshaped or recast tensor cannot collide)."""
    h = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def summarize(epochs: list) -> dict:
    """Medians exclude the first (warm-up) epoch when there is more than one."""
    timed = epochs[1:] if len(epochs) > 1 else epochs

    def median(key):
        values = [e[key] for e in timed if e.get(key) is not None]
        return statistics.median(values) if values else None

    return {
        "median_epoch_time_s": median("epoch_time_s"),
        "images_per_s": median("images_per_s"),
        "peak_memory_bytes": max((e["peak_memory_bytes"] for e in epochs), default=None),
        "final_test_acc": epochs[-1]["test_acc"] if epochs else None,
        "epochs_done": len(epochs),
    }


def timestamp() -> str:
    """The time part of run and compare folder names: sortable, local time."""
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def new_run_id(impl: str, precision: str) -> str:
    return f"{timestamp()}-{impl}-{precision}-{uuid.uuid4().hex[:6]}"


class Recorder:
    """Owns the run folder and result.json of one run. As a context manager it turns the way
    the loop ended (normally, Ctrl-C, OOM, divergence, any error) into the recorded status."""

    def __init__(self, cfg, impl: str, policy, device: torch.device, switches: dict,
                 opt_level: Optional[str] = None):
        self.device = device
        run_id = cfg.run_id or new_run_id(impl, policy.effective)
        self.run_dir = os.path.join(cfg.out_dir, run_id)
        self.path = os.path.join(self.run_dir, "result.json")
        self.result = RunResult(schema=SCHEMA, run_id=run_id, impl=impl, repeat=cfg.repeat,
                                seed=cfg.seed, status="running", error=None, precision=policy.to_dict(), opt_level=opt_level,
                                config=cfg.to_dict(), env=environment(device, switches))

    def __enter__(self) -> "Recorder":
        try:
            os.makedirs(self.run_dir, exist_ok=False)
        except FileExistsError:
            raise UsageError(f"{self.run_dir} already exists; choose another --run-id") from None
        except OSError as e:
            raise UsageError(f"cannot create {self.run_dir}: {e.strerror}") from None
        reset_peak_memory(self.device)
        self.write()
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is None:
            self.result.status = "ok"
            return False
        status = ("interrupted" if issubclass(kind, KeyboardInterrupt) else
                  "oom" if issubclass(kind, OOM) else
                  "diverged" if issubclass(kind, Diverged) else "failed")
        if not issubclass(kind, Exception) and status != "interrupted":
            return False  # SystemExit and friends are not ours to swallow
        self.result.status = status
        self.result.error = None if status == "interrupted" else f"{kind.__name__}: {exc}"
        if status == "failed":
            with open(os.path.join(self.run_dir, "error.log"), "w") as f:
                f.write("".join(traceback.format_exception(kind, exc, tb)))
        self.write()
        return True  # recorded; train() still saves weights and returns the result

    def add_epoch(self, row: dict, losses: list) -> None:
        self.result.epochs.append(row)
        self.result.step_losses.extend(losses)
        self.result.summary = summarize(self.result.epochs)
        self.write()

    def close(self, model: torch.nn.Module, **checkpoint) -> RunResult:
        """Hash the shared model's weights, save the checkpoint, write the final result."""
        self.result.weights_sha256 = weights_sha256(model)
        if self.result.config["checkpoint"]:
            torch.save({"model": model.state_dict(), **checkpoint},
                       os.path.join(self.run_dir, "checkpoint.pt"))
        self.write()
        return self.result

    def write(self) -> None:
        write_json(self.path, self.result.to_dict())
