"""Which process of a job this is, from the environment a launcher sets (the standard library
only: the command line asks before torch is imported).

A launcher (torchrun, or `ampcompare <arm> --devices N`) sets RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT together. One of them left over in a shell (a
stray RANK=1) is not a launch: the process runs alone, and says that it ignored them.
"""

from __future__ import annotations

import os
from typing import Optional

VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)
# Set by `ampcompare <arm> --devices N` for the processes it starts: it prints their summary.
OURS = "AMPCOMPARE_LAUNCHER"
# Set by torchrun for every process it starts.
TORCHRUN = "TORCHELASTIC_RUN_ID"


def launched() -> bool:
    """Whether this process is one of several that a launcher started."""
    return all(os.environ.get(v) for v in VARIABLES)


def stray() -> list[str]:
    """The launcher variables set in the environment of a process no launcher started."""
    return [] if launched() else [v for v in VARIABLES if os.environ.get(v)]


def rank() -> int:
    """This process's rank (0 alone); -1 when a launcher's RANK is not a number."""
    if not launched():
        return 0
    try:
        return int(os.environ["RANK"])
    except ValueError:
        return -1


def is_rank0() -> bool:
    """Rank 0 (or a process on its own): the one that prints and writes."""
    return rank() == 0


def speaks() -> bool:
    """Whether this process prints an error: one line per terminal. torchrun and our launcher
    start a node's processes together, so local rank 0 speaks for its node; under a launcher
    neither names (or with a launcher's variables left in a shell) no process can know that
    another will, so each speaks."""
    if not launched():
        return True
    if os.environ.get(TORCHRUN) or os.environ.get(OURS):
        return os.environ.get("LOCAL_RANK") == "0"
    return True


def who() -> str:
    """ " (rank N of M)" where the process is not a job's first, to begin its error lines."""
    if not launched() or rank() == 0:
        return ""
    return f" (rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']})"


def under_our_launcher() -> bool:
    return launched() and bool(os.environ.get(OURS))


def threads() -> Optional[int]:
    """OMP_NUM_THREADS as torch.set_num_threads takes it: the first level of OpenMP's list
    syntax ("2,1": 2); None when unset. ValueError with the line to show when it is not one."""
    value = os.environ.get("OMP_NUM_THREADS")
    if value is None or not value.strip():
        return None
    levels = [level.strip() for level in value.split(",")]
    # ASCII digits only: str.isdigit takes "２", which OpenMP refuses (and so do later levels)
    if not all(level.isascii() and level.isdigit() and int(level) >= 1 for level in levels):
        raise ValueError(
            f"OMP_NUM_THREADS={value!r} is not a number of threads (a positive "
            f"integer, or OpenMP's list such as 2,1); set it to one, or unset it"
        )
    return int(levels[0])
