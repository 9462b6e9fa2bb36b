"""Lines for a person, written so that output going away never stops a measurement.

A pipe whose reader has gone (`ampcompare compare ... | head -1`), or a terminal that was
closed, makes a write fail (EPIPE, EIO). Such a stream is then pointed at /dev/null and the run
goes on: every file is written, and the exit code is the record's. A terminal whose encoding
cannot show a character (an ASCII locale) gets a "?" in its place; files are always UTF-8.
"""

from __future__ import annotations

import errno
import os
import sys

GONE = (errno.EPIPE, errno.EIO, errno.ECONNRESET)


def setup() -> None:
    """Make the standard streams print what the terminal can take."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="replace")
        except (AttributeError, ValueError):
            pass


def say(text: str = "", err: bool = False) -> None:
    """One line (or more) on stdout, or stderr with err=True, whatever became of it."""
    stream = sys.stderr if err else sys.stdout
    try:
        stream.write(text + "\n")
        stream.flush()
    except OSError as e:
        if e.errno not in GONE and not isinstance(e, BrokenPipeError):
            raise
        silence(stream)
    except ValueError:  # closed already
        pass


def silence(stream) -> None:
    """From now on, what is written to `stream` goes nowhere: its descriptor is /dev/null (so
    that the interpreter's last flush does not fail either)."""
    try:
        fd = stream.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
