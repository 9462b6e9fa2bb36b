"""A run's checkpoint and its record, written so that a crash at any instant leaves a pair that
belongs together.

Every epoch's checkpoint is a new file, checkpoint-<epochs>.pt, named in result.json. The end of
an epoch writes the new checkpoint under its own name (the old pair is untouched), then renames
the new record into place — the one step that moves the run on — and only then removes the
checkpoint the old record named. A process killed before that rename leaves the old record and
the old checkpoint (and a new file no record names); killed after it, the new pair (and an old
file no record names). Files that no record names are removed by the next resume, or by
compare, once no process writes the folder.
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional

from record import schema, signals
from record.files import write_temp_json
from record.rundir import RESERVE, remove


def file_for(epochs: int) -> str:
    """The file of the checkpoint that holds `epochs` epochs."""
    return f"checkpoint-{epochs}.pt"


def file_named_in(record: Optional[dict]) -> Optional[str]:
    """The checkpoint file a record names, when it is a well-formed name (never a path)."""
    info = (record or {}).get("checkpoint")
    file = info.get("file") if isinstance(info, dict) else None
    return file if isinstance(file, str) and schema.CHECKPOINT_NAME.fullmatch(file) else None


def synced_sha256(path: str) -> str:
    """The file's SHA-256, once it is on disk."""
    h = hashlib.sha256()
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sync_folder(folder: str) -> None:
    """Make the folder's renames durable (a file's own fsync does not cover its name)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(
    run_dir: str, record: dict, staged: Optional[str] = None, file: Optional[str] = None
) -> None:
    """Put a staged checkpoint in place as `file` (a name no record uses yet), then the record
    that names it: signals are held back until both are on disk."""
    path = os.path.join(run_dir, "result.json")
    with signals.deferred():
        if staged is not None:
            os.replace(staged, os.path.join(run_dir, file))
        os.replace(write_temp_json(path, record), path)
        sync_folder(run_dir)


def leftovers(run_dir: str, keep: Optional[str]) -> list[str]:
    """What a process that stopped mid-write leaves: temporary files, the reserve, and the
    checkpoints that no record names (all but `keep`)."""
    out = []
    for entry in os.listdir(run_dir):
        if (
            entry.startswith(".tmp-")
            or entry == RESERVE
            or (schema.CHECKPOINT_NAME.fullmatch(entry) and entry != keep)
        ):
            out.append(entry)
    return out


def clean(run_dir: str, record: Optional[dict]) -> None:
    """Remove the leftovers of the run in run_dir (whose record is `record`, None when it has
    none or an unreadable one: then its checkpoints are kept). Only where no process writes."""
    keep = file_named_in(record)
    for entry in leftovers(run_dir, keep):
        if record is None and schema.CHECKPOINT_NAME.fullmatch(entry):
            continue  # without a record, nothing says which checkpoint is the run's
        remove(os.path.join(run_dir, entry))
