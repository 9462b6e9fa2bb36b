"""A run's folder: made (and taken away again when the run could not start in it), locked for
the one process that writes it, and holding a reserve, so that a disk that fills up still has
room for the run's last record."""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Optional

from common.errors import UsageError

RESERVE = ".reserve"
LOCK = ".lock"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
BUSY = "another process is writing that run"


def first_existing(path: str) -> str:
    """The nearest folder on the way up to path that exists (path itself when it does)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def make(run_dir: str) -> Optional[str]:
    """Make the run's folder (FileExistsError when it is there); return the highest folder
    made, for taking them away again."""
    top, probe = None, os.path.abspath(run_dir)
    while not os.path.exists(probe):
        top, probe = probe, os.path.dirname(probe)
    os.makedirs(run_dir, exist_ok=False)
    return top


def lock(folder: str, busy: str) -> int:
    """An exclusive lock on the folder for as long as this process lives (or the descriptor
    returned stays open); UsageError(busy) when another process holds it."""
    fd = os.open(os.path.join(folder, LOCK), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(busy) from None
    return fd


def held(folder: str) -> bool:
    """Whether a live process holds the folder's lock (a run writes nothing before taking
    it); asked without taking it, and without making a lock file."""
    try:
        fd = os.open(os.path.join(folder, LOCK), os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def reserve(run_dir: str, size: int) -> None:
    """Keep `size` bytes allocated in the run folder; the last record is written into the room
    they free. Where the disk cannot give them, the run is better stopped now (OSError)."""
    path = os.path.join(run_dir, RESERVE)
    if os.path.exists(path) and os.path.getsize(path) >= size:
        return
    with open(path, "ab") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as e:
            if e.errno in DISK_FULL:
                raise OSError(e.errno, e.strerror, path) from None
            f.write(b"\0" * (size - f.tell()))  # a filesystem without fallocate


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def check_out_dir(out_dir: str, option: str = "--out-dir") -> None:
    """Fail before anything is written if nothing can be written in out_dir (the nearest
    folder of it that exists): `option` names what the user gave."""
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
