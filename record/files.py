"""Files written whole: a temporary file beside the target, flushed and synced, then renamed, so
that a reader at any moment sees the old file or the new one, complete; JSON in strict form (a
NaN or infinite number becomes null, and `nonfinite` says where)."""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
from typing import Any, Callable


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
