"""Ctrl-C, SIGTERM and SIGHUP end a run as an interruption, exactly once.

The first SIGINT, SIGTERM or SIGHUP raises KeyboardInterrupt (SIGTERM too: a scheduler or
`timeout` sends it; SIGHUP: the terminal was closed; each must leave the same partial result as
Ctrl-C). Later ones are absorbed: the run
is already stopping, and a second exception raised while the first one's result is being written
would leave that result half done. A `deferred()` section (renaming a checkpoint and its record
together) holds a signal back until the section ends.

`install()` is the first thing the command line does; without it (a test calling train()),
Python's default SIGINT handling applies and `deferred()` changes nothing.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager

from common import ranks  # the standard library only, as this module: imported before torch

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_state = {
    "installed": False,
    "stopping": False,
    "pending": False,
    "depth": 0,
    "received": 0,
    "first": None,
}


_listener = None  # set by listening() alone


@contextmanager
def listening(listener):
    """Within it, listener() is called on every signal, before anything else: the bench, whose
    arms run in threads, stops them all with it (a KeyboardInterrupt reaches only the main
    thread, or is held back). Nested, the inner listener is called for its time."""
    global _listener
    outer, _listener = _listener, listener
    try:
        yield
    finally:
        _listener = outer


def _handler(signum, frame):
    _state["received"] += 1
    _state["first"] = _state["first"] or signum
    if _listener is not None:
        _listener()
    if _state["stopping"]:
        return
    if _state["depth"]:
        _state["pending"] = True
        return
    _state["stopping"] = True
    raise KeyboardInterrupt


def install() -> None:
    _state.update(
        installed=True, stopping=False, pending=False, depth=0, received=0, first=None
    )
    for sig in SIGNALS:
        signal.signal(sig, _handler)


def absorb_from_now() -> None:
    """The run has reached its end and is writing its last record: a signal from here on has
    nothing left to interrupt, and is absorbed."""
    _state["stopping"] = True


def block_for_exit() -> None:
    """Ignore SIGINT, SIGTERM and SIGHUP for the last moments of the process. Python puts the
    default handlers back while it shuts down (but leaves an ignored signal ignored), and a
    signal then, to any of its threads, would end the process with a status (143, 129, a
    traceback in an atexit hook) that its record does not say."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def received() -> int:
    """How many SIGINT/SIGTERM/SIGHUP this process has had since install()."""
    return _state["received"]


def first() -> str | None:
    """The name of the first of them (SIGTERM, say), or None."""
    return signal.Signals(_state["first"]).name if _state["first"] else None


def interrupted_exit() -> int:
    """The exit code of an interrupted process: 130 (Ctrl-C's) for the command a user ran; for
    a rank of a job, 128 + the signal's number, so that the launcher can tell which it was."""
    return 128 + _state["first"] if ranks.launched() and _state["first"] else 130


@contextmanager
def deferred():
    """Hold the signals back until the block ends; then raise the interrupt, if one came."""
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
    if _state["depth"] == 0 and _state["pending"] and not _state["stopping"]:
        _state.update(pending=False, stopping=True)
        raise KeyboardInterrupt


def die_with_parent() -> None:
    """Get SIGTERM when the parent process dies (Linux), so that no process of a job trains on
    alone after its launcher was killed; exit at once if it is gone already."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:
        os._exit(130)
