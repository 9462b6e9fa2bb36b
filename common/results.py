"""result.json: one run's record. Written atomically (a temporary file, flushed and synced, then
renamed), in strict JSON (a NaN or infinite number becomes null, and `nonfinite` says where), so
that any reader at any moment sees a complete, valid file."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import math
import os
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch

from common import activations
from common.errors import UsageError

# 2: repeat and seed as fields; 3: checkpoint, nonfinite, warm-up rows, pid, resumes; 4: step
# times (each epoch's step_times_s and step_waits_s, the summary's step-time figures, the
# clock);
# 5: model (spec, parameters, source), flops.counted, unsaved_epoch, per-epoch checkpoints
SCHEMA = 5
EXIT_CODES = {"ok": 0, "interrupted": 130}  # diverged, oom, failed: 1
STATUSES = ("running", "ok", "interrupted", "diverged", "oom", "failed", "unavailable")


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
    pid: int = 0
    epochs: list = field(default_factory=list)
    step_losses: list = field(default_factory=list)
    flops: Optional[dict] = None  # per step and image, and the peak MFU is measured against
    # The model: its spec as given, parameter count and (an import path) its source's SHA-256
    model: Optional[dict] = None
    weights_sha256: Optional[str] = None
    weights_epochs: Optional[int] = None  # how many epochs of training the hashed weights had
    checkpoint: Optional[dict] = None
    # Each resume: the epoch it continued from and its process's env (env itself is the first
    # process's; what must match, such as the torch version, was checked at each resume).
    resumes: list = field(default_factory=list)
    # An epoch that ended but whose checkpoint was never written (interrupted, disk full): its
    # measurements, in no figure; a resume redoes that epoch.
    unsaved_epoch: Optional[dict] = None
    summary: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.status, 1)

    def to_dict(self) -> dict:
        return asdict(self)


def without_nonfinite(obj: Any, where: str = "") -> tuple[Any, list[str]]:
    """obj with every NaN or infinite float replaced by None, and where each one was."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None, [f"{where}: {obj}"]
    notes = []
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out[k], more = without_nonfinite(v, f"{where}.{k}" if where else str(k))
            notes += more
        return out, notes
    if isinstance(obj, (list, tuple)):
        out = []
        for i, v in enumerate(obj):
            value, more = without_nonfinite(v, f"{where}[{i}]")
            out.append(value)
            notes += more
        return out, notes
    return obj, notes


def write_temp(path: str, write: Callable[[Any], None], binary: bool = False) -> str:
    """`write(file)` into a synced temporary file beside path, readable as the umask allows;
    return its name, for an os.replace that readers see as all or nothing."""
    folder = os.path.dirname(os.path.abspath(path))
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes files only their owner can read
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """The process's umask, read once, when first needed (os.umask reads it only by setting
    it, so it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_file(path: str, write: Callable[[Any], None], binary: bool = False) -> None:
    """Temp file + rename in the same folder: readers never see half a file."""
    os.replace(write_temp(path, write, binary), path)


def write_temp_json(path: str, obj: Any) -> str:
    """write_temp() obj as strict JSON: a NaN or infinity is written as null and listed under
    "nonfinite" (strict JSON readers reject NaN)."""
    clean, notes = without_nonfinite(obj)
    if notes and isinstance(clean, dict):
        clean["nonfinite"] = ["null below was not finite: " + n for n in notes]

    def dump(f):
        json.dump(clean, f, indent=1, allow_nan=False)
        f.write("\n")

    return write_temp(path, dump)


def write_json(path: str, obj: Any) -> None:
    os.replace(write_temp_json(path, obj), path)


def read(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "result.json"), encoding="utf-8") as f:
        return json.load(f)


def why_not_a_record(record: Any, complete: bool = False) -> Optional[str]:
    """Why a parsed result.json is not a run record this tool can read, or None (every reader
    of a record checks it here: common/schema.py). complete: also every option in its config,
    as a resume needs them to continue the run as it was."""
    from common import config, schema

    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    wrong = schema.why(record, schema.record_shape(STATUSES), "")
    if wrong:
        return wrong
    fields = {f.name: f for f in dataclasses.fields(config.Config)}
    for name, value in record["config"].items():
        if name in fields:
            try:
                config._check(fields[name], value)
            except UsageError as e:
                return f"config.{name}: {e}"
    missing = [name for name in fields if name not in record["config"]]
    if complete and missing:
        return f"config has no {', '.join(missing)}"
    return None


def check_out_dir(out_dir: str, option: str = "--out-dir") -> None:
    """Fail before anything is written if nothing can be written in out_dir (the nearest
    folder of it that exists): `option` names what the user gave."""
    from common.rundir import first_existing

    probe = first_existing(out_dir)
    if os.path.isdir(probe) and os.access(probe, os.W_OK | os.X_OK):
        return
    why = "is not a writable folder"
    try:
        if os.path.isdir(probe) and os.statvfs(probe).f_flag & os.ST_RDONLY:
            why = "is on a read-only filesystem"
    except OSError:
        pass
    if option == "--resume":
        raise UsageError(
            f"--resume {out_dir}: {probe} {why}; a resumed run writes its record "
            f"and checkpoint there"
        )
    raise UsageError(f"{option} {out_dir}: {probe} {why}; choose another {option}")


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the common model's state_dict (state_sha256), out of any wrapper."""
    from common.models import unwrapped

    return state_sha256(unwrapped(model).state_dict())


def state_sha256(state: dict) -> str:
    """SHA-256 over a state_dict: keys sorted, each tensor's contiguous CPU bytes in its own
    dtype (with name, dtype and shape, so a reshaped or recast tensor cannot collide)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# A run of one epoch (or a resumed run's only new one) has no warm-up-free epoch: its first
# steps, slow while the allocator and the kernels' caches fill, are left out instead.
WARMUP_STEPS = 5


def timed_steps(epochs: list) -> tuple[list, str]:
    """The step times that timing figures rest on, in order, and the rule that chose them: the
    steps of every epoch that is not a warm-up epoch (the first a process runs: a resumed run
    has two); where every epoch is one, each epoch's steps after its first WARMUP_STEPS (fewer
    when an epoch has fewer than twice that many)."""
    warm = [e.get("warmup", i == 0) for i, e in enumerate(epochs)]
    timed = [e for e, w in zip(epochs, warm) if not w]
    if timed:
        return (
            [t for e in timed for t in e.get("step_times_s") or []],
            "warm-up epochs left out (the first epoch of each process)",
        )
    steps = []
    for e in epochs:
        times = e.get("step_times_s") or []
        steps += times[min(WARMUP_STEPS, len(times) // 2) :]
    return steps, (
        f"every epoch is a warm-up epoch: the first {WARMUP_STEPS} steps of each "
        f"left out (fewer in an epoch of under {2 * WARMUP_STEPS} steps)"
    )


def summarize(epochs: list, env: Optional[dict] = None) -> dict:
    """Medians leave out warm-up epochs (the first a process runs: a resumed run has two) when
    any other epoch is there; step times follow timed_steps(). On CUDA the allocator's peak is
    also given less the image sets held there (env's data_on_device_bytes): what the precision
    can change."""
    from common import stats

    median = stats.median

    warm = [e.get("warmup", i == 0) for i, e in enumerate(epochs)]
    timed = [e for e, w in zip(epochs, warm) if not w] or epochs

    saved = next((e["saved_tensors"] for e in epochs if e.get("saved_tensors")), None)
    peak, env = max((e["peak_memory_bytes"] for e in epochs), default=None), env or {}
    scales = [e["loss_scale"] for e in epochs if e.get("loss_scale") is not None]
    steps, rule = timed_steps(epochs)
    q1, step, q3 = stats.quartiles(steps) or (None, None, None)
    return {
        "median_step_time_s": step,
        "step_time_q1_s": q1,
        "step_time_q3_s": q3,
        "timed_steps": len(steps),
        "step_timing": rule,
        "median_epoch_time_s": median(e.get("epoch_time_s") for e in timed),
        "images_per_s": median(e.get("images_per_s") for e in timed),
        "achieved_tflops": median(e.get("achieved_tflops") for e in timed),
        "mfu": median(e.get("mfu") for e in timed),
        "data_wait_fraction": median(
            e["data_wait_s"] / e["train_time_s"] for e in timed if e.get("train_time_s")
        ),
        "activation_bytes": activations.total(saved) if saved else None,
        "peak_memory_bytes": peak,
        "peak_beyond_data_bytes": peak - env.get("data_on_device_bytes", 0)
        if peak is not None and env.get("device") == "cuda"
        else None,
        "skipped_steps": sum(e.get("skipped_steps") or 0 for e in epochs),
        "loss_scale_first": scales[0] if scales else None,
        "loss_scale_last": scales[-1] if scales else None,
        "final_test_acc": epochs[-1]["test_acc"] if epochs else None,
        "epochs_done": len(epochs),
    }


def timestamp() -> str:
    """The time part of run and compare folder names: sortable, local time."""
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def new_run_id(impl: str, precision: str) -> str:
    return f"{timestamp()}-{impl}-{precision}-{uuid.uuid4().hex[:6]}"
