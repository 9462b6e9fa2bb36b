"""The shape of a result.json: one check, used by everything that reads a record back (a resume,
compare, report), so that a record edited by hand, cut short or written by another version is
named and skipped or refused in one line, never a KeyError deep inside.

A shape is a type, a tuple of types, a list of one shape ([shape]: every item), a dict of
shapes (the keys a record may have; `Required` marks the ones it must have), or a callable that
returns why a value is wrong. Numbers are ints or floats, never bools; None is allowed only
where the shape says so (strict JSON writes a NaN as null).
"""

from __future__ import annotations

import re
from typing import Any, Optional

from common import model_state

NUMBER = (int, float)
HEX64 = re.compile(r"[0-9a-f]{64}")
CHECKPOINT_NAME = re.compile(r"checkpoint(-[0-9]{1,9})?\.pt")


class Required:
    def __init__(self, shape):
        self.shape = shape


def maybe(shape):
    """The shape, or None."""
    return (
        (shape, type(None))
        if isinstance(shape, type)
        else (*shape, type(None))
        if isinstance(shape, tuple)
        else _or_none(shape)
    )


def _or_none(shape):
    def check(value, where):
        return None if value is None else why(value, shape, where)

    return check


def at_least(low: int):
    def check(value, where):
        if not _is(value, int):
            return f"{where} is {_what(value)}, not an integer"
        return f"{where} is {value}, below {low}" if value < low else None

    return check


def one_of(*names):
    def check(value, where):
        return (
            None
            if isinstance(value, str) and value in names
            else f"{where} is {value!r}, not one of {', '.join(names)}"
        )

    return check


def matching(pattern: re.Pattern, what: str):
    def check(value, where):
        return (
            None
            if isinstance(value, str) and pattern.fullmatch(value)
            else f"{where} is {value!r}, not {what}"
        )

    return check


MOST_BYTES = 2**64  # more than any machine addresses


def byte_count(value, where):
    """A size in bytes: a number from 0 to MOST_BYTES (a report divides by it, as floats)."""
    if not _is(value, NUMBER):
        return f"{where} is {_what(value)}, not a number"
    if not 0 <= value <= MOST_BYTES:  # NaN too: it compares false
        return f"{where} is {shown(repr(value))}, not a count of bytes"
    return None


def shown(text: str, most: int = 40) -> str:
    """A value as a message quotes it: its first characters, where it is long."""
    return text if len(text) <= most else f"{text[: most - 1]}…"


NUMBERS = [maybe(NUMBER)]
EPOCH = {
    "epoch": at_least(0),
    "warmup": bool,
    "train_loss": maybe(NUMBER),
    "test_loss": maybe(NUMBER),
    "test_acc": maybe(NUMBER),
    "epoch_time_s": maybe(NUMBER),
    "train_time_s": maybe(NUMBER),
    "train_cpu_s": maybe(NUMBER),
    "images_per_s": maybe(NUMBER),
    "data_wait_s": maybe(NUMBER),
    "peak_memory_bytes": maybe(NUMBER),
    "peak_memory_bytes_per_rank": [NUMBER],
    "steps": at_least(0),
    "skipped_steps": maybe(int),
    "loss_scale": maybe(NUMBER),
    "step_clock": str,
    "step_times_s": NUMBERS,
    "step_waits_s": NUMBERS,
    "achieved_tflops": maybe(NUMBER),
    "mfu": maybe(NUMBER),
    "saved_tensors": {"activations": NUMBER, "integer": NUMBER, "weight_copies": NUMBER},
    "model_state": {part: byte_count for part in model_state.PARTS},
}
CHECKPOINT = {
    "file": Required(matching(CHECKPOINT_NAME, "a checkpoint's file name")),
    "epochs": Required(at_least(0)),
    "sha256": Required(matching(HEX64, "a SHA-256")),
    "weights_sha256": Required(matching(HEX64, "a SHA-256")),
}
ENV = {
    "device": str,
    "device_name": maybe(str),
    "cuda_capability": maybe(str),
    "tensor_cores": bool,
    "cpu_model": maybe(str),
    "cpu_bf16": bool,
    "threads": int,
    "python": maybe(str),
    "torch": maybe(str),
    "torchvision": maybe(str),
    "lightning": maybe(str),
    "apex": maybe(str),
    "accelerate": maybe(str),
    "git_commit": maybe(str),
    "host": maybe(str),
    "pid": int,
    "started": NUMBER,
    "cleared_environment": dict,
    "pids": [int],
    "world_size": at_least(1),
    "nodes": at_least(1),
    "backend": maybe(str),
    "data_on_device_bytes": NUMBER,
}
SUMMARY_TEXT = ("step_timing",)  # the summary's entries that are words, not numbers


def _summary(value, where):
    if not isinstance(value, dict):
        return f"{where} is {_what(value)}, not an object"
    for key, v in value.items():
        shape = (
            maybe(str)
            if key in SUMMARY_TEXT
            else maybe(byte_count)
            if key.endswith("_bytes")
            else maybe(NUMBER)
        )
        wrong = why(v, shape, f"{where}.{key}")
        if wrong:
            return wrong
    return None


FLOPS = {
    "per_step": maybe(NUMBER),
    "per_image": maybe(NUMBER),
    "batch_size": int,
    "counted": maybe(str),
    "peak_tflops": maybe(NUMBER),
    "peak": maybe(str),
}
SHA256 = matching(HEX64, "a SHA-256")
MODEL = {
    "spec": Required(str),
    "parameters": at_least(0),
    "source": maybe(str),
    "source_sha256": maybe(SHA256),
}
RESUMES = [{"epoch": Required(at_least(0)), "env": Required(dict)}]
SUMMARY = _summary
RETIRED = {"nonfinite": [str]}  # entries an older record may hold, which no field writes now


def why(value: Any, shape, where: str = "the record") -> Optional[str]:
    """Why `value` does not have `shape`, naming the place; None when it does."""
    if isinstance(shape, Required):
        shape = shape.shape
    if callable(shape) and not isinstance(shape, type):
        return shape(value, where)
    if isinstance(shape, (type, tuple)):
        return None if _is(value, shape) else f"{where} is {_what(value)}, not {_name(shape)}"
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{where} is {_what(value)}, not a list"
        for i, item in enumerate(value):
            wrong = why(item, shape[0], f"{where}[{i}]")
            if wrong:
                return wrong
        return None
    if not isinstance(value, dict):
        return f"{where} is {_what(value)}, not an object"
    missing = [k for k, s in shape.items() if isinstance(s, Required) and k not in value]
    if missing:
        return f"{where} has no {', '.join(missing)}"
    for key, sub in shape.items():
        if key in value:
            wrong = why(value[key], sub, f"{where}.{key}" if where else key)
            if wrong:
                return wrong
    return None


def _is(value, kinds) -> bool:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(value, bool):
        return bool in kinds
    return isinstance(value, kinds)


def _name(shape) -> str:
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        dict: "an object",
        list: "a list",
        type(None): "null",
    }
    kinds = shape if isinstance(shape, tuple) else (shape,)
    if set(kinds) >= {int, float}:
        kinds = tuple(k for k in kinds if k not in (int, float)) + (float,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _what(value) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
