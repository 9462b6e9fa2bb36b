"""result.json: one run's record — its fields, its statuses, how it is read back and checked,
the hash of its weights. record/files.py writes it whole; record/summary.py sums it up."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from common import config, sharding
from common.precision import CANONICAL
from common.errors import UsageError
from common.models import unwrapped
from record import schema

# 2: repeat and seed as fields; 3: checkpoint, nonfinite, warm-up rows, pid, resumes; 4: step
# times (each epoch's step_times_s and step_waits_s, the summary's step-time figures, the
# clock);
# 5: model (spec, parameters, source), flops.counted, unsaved_epoch, per-epoch checkpoints;
# 6: each epoch's model_state and the summary's state bytes, and the true rungs (bf16-true,
# 16-true) as precisions; 7: config.strategy, and bf16-fsdp as a precision
SCHEMA = 7
EXIT_CODES = {"ok": 0, "interrupted": 130}  # diverged, oom, failed: 1
STATUSES = ("running", "ok", "interrupted", "diverged", "oom", "failed", "unavailable")
S = schema


def shaped(shape, **kw):
    """A field of the record, with the shape a result.json's entry must have (record/schema.py):
    the record's type and its check are one declaration."""
    return field(metadata={"shape": shape}, **kw)


class NotARecord(ValueError):
    """A result.json this tool cannot read as a run record; the message says why, in a line."""


@dataclass
class Precision:
    requested: str  # as given (canonical form)
    effective: Optional[str]  # what ran; None for a run that never started

    @property
    def ran(self) -> str:
        """What the run trained at, or for a run that never started what it was to run."""
        return self.effective or self.requested


@dataclass
class RunResult:
    schema: int = shaped(S.at_least(1))
    run_id: str = shaped(S.Required(str))
    impl: str = shaped(S.Required(str))
    repeat: int = shaped(S.at_least(0))
    seed: int = shaped(S.at_least(0))
    status: str = shaped(S.Required(S.one_of(*STATUSES)))
    error: Optional[str] = shaped(S.maybe(str))
    precision: Precision = shaped(
        S.Required(
            {
                "requested": S.Required(S.one_of(*CANONICAL, "auto")),
                "effective": S.Required(S.maybe(S.one_of(*CANONICAL))),
            }
        )
    )
    opt_level: Optional[str] = shaped(S.maybe(str))
    config: dict = shaped(S.Required(dict))
    env: dict = shaped(S.Required(S.ENV))
    pid: int = shaped(int, default=0)
    epochs: list = shaped(S.Required([S.EPOCH]), default_factory=list)
    step_losses: list = shaped(S.NUMBERS, default_factory=list)
    # per step and image, and the peak MFU is measured against
    flops: Optional[dict] = shaped(S.maybe(S.FLOPS), default=None)
    # The model: its spec as given, parameter count and (an import path) its source's SHA-256
    model: Optional[dict] = shaped(S.maybe(S.MODEL), default=None)
    weights_sha256: Optional[str] = shaped(S.maybe(S.SHA256), default=None)
    # how many epochs of training the hashed weights had
    weights_epochs: Optional[int] = shaped(S.maybe(S.at_least(0)), default=None)
    checkpoint: Optional[dict] = shaped(S.maybe(S.CHECKPOINT), default=None)
    # Each resume: the epoch it continued from and its process's env (env itself is the first
    # process's; what must match, such as the torch version, was checked at each resume).
    resumes: list = shaped(S.RESUMES, default_factory=list)
    # An epoch that ended but whose checkpoint was never written (interrupted, disk full): its
    # measurements, in no figure; a resume redoes that epoch.
    unsaved_epoch: Optional[dict] = shaped(S.maybe(S.EPOCH), default=None)
    summary: dict = shaped(S.Required(S.SUMMARY), default_factory=dict)
    # Where a report found the record, relative to the folder it was given: never written.
    found_at: Optional[str] = field(default=None, compare=False, metadata={"shape": None})

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.status, 1)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k in _SAVED}

    @classmethod
    def shape(cls) -> dict:
        """The shape of a result.json, from the fields above (and the entry a schema-3 record
        may still hold)."""
        return {f.name: f.metadata["shape"] for f in _fields(cls)} | S.RETIRED

    @classmethod
    def stand_in(cls, precision: str, **fields) -> "RunResult":
        """The record of a run that wrote none of its own: it could not run here, or its
        process ended before it could (compare writes it, with why). It ran no precision."""
        return cls(schema=SCHEMA, precision=Precision(precision, None), **fields)

    @classmethod
    def from_dict(cls, record: dict) -> "RunResult":
        """A parsed result.json that why_not_a_record() passed, as the type. An entry an older
        record lacks takes its field's default (None where the field has none); one that no
        field holds now (S.RETIRED) is left out."""
        values = {}
        for f in _fields(cls):
            if f.name in record:
                values[f.name] = record[f.name]
            elif f.default is not dataclasses.MISSING:
                values[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                values[f.name] = f.default_factory()
            else:
                values[f.name] = None
        p = record["precision"]
        values["precision"] = Precision(p["requested"], p["effective"])
        return cls(**values)

    @classmethod
    def read(cls, run_dir: str, complete: bool = False) -> "RunResult":
        """The record in run_dir/result.json, read and checked once (why_not_a_record; complete:
        every option too). OSError where the file cannot be read; NotARecord, saying why in a
        line, where what it holds is not a record this tool reads."""
        record = read_json(run_dir)
        why = why_not_a_record(record, complete)
        if why:
            raise NotARecord(why)
        return cls.from_dict(record)


def read_json(run_dir: str) -> Any:
    """What run_dir/result.json holds, parsed as it is: OSError where it cannot be read,
    NotARecord where it is not JSON."""
    with open(os.path.join(run_dir, "result.json"), encoding="utf-8") as f:
        try:
            return json.load(f, parse_constant=_not_strict)
        except _NotStrict as e:  # a record is written strict: NaN as null
            raise NotARecord(f"not strict JSON (it holds {e})") from None
        except (ValueError, RecursionError):  # RecursionError: nested past the parser
            raise NotARecord("not valid JSON") from None


class _NotStrict(Exception):
    pass


def _not_strict(name: str):
    raise _NotStrict(name)


def _fields(cls) -> list:
    """The fields a result.json holds (found_at is the reader's, never written)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("shape") is not None]


_SAVED = {f.name for f in _fields(RunResult)}


def newer_schema(number: Any) -> Optional[str]:
    """Why a file of schema `number` is not this code's to read (a newer one), or None."""
    if isinstance(number, int) and not isinstance(number, bool) and number > SCHEMA:
        return f"written by a newer ampcompare (schema {number}; this one reads 1 to {SCHEMA})"
    return None


def why_not_a_record(record: Any, complete: bool = False) -> Optional[str]:
    """Why a parsed result.json is not a run record this tool can read, or None (every reader
    of a record checks it here: record/schema.py). complete: also every option in its config,
    as a resume needs them to continue the run as it was."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    newer = newer_schema(record.get("schema"))
    if newer:
        return newer
    wrong = schema.why(record, RunResult.shape(), "")
    if wrong:
        return wrong
    for name in ("seed", "repeat"):  # written twice: a hand edit of one would go unseen
        value, configured = record.get(name), record["config"].get(name)
        if value is not None and configured is not None and value != configured:
            return f"{name} {value} disagrees with config.{name} {configured}"
    if record["status"] == "ok" and record["precision"]["effective"] is None:
        return "an ok run with no precision it ran (precision.effective is null)"
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


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the common model's state_dict (state_sha256), out of any wrapper; a
    sharded model's gathered whole (a collective: every rank calls it)."""
    return state_sha256(sharding.full_state_dict(unwrapped(model)))


def state_sha256(state: dict) -> str:
    """SHA-256 over a state_dict: keys sorted, each tensor's contiguous CPU bytes in its own
    dtype (with name, dtype and shape, so a reshaped or recast tensor cannot collide)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def timestamp() -> str:
    """The time part of run and compare folder names: sortable, local time."""
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def new_run_id(impl: str, precision: str) -> str:
    return f"{timestamp()}-{impl}-{precision}-{uuid.uuid4().hex[:6]}"
