"""Errors the CLI turns into one line and an exit code instead of a traceback."""

import os


class UsageError(Exception):
    """Bad option or missing environment piece (exit 2). The message is the one line shown."""


class Unavailable(UsageError):
    """This machine cannot run that arm at all: apex missing or without amp, no CUDA, no bf16,
    a framework that picks another precision here. Exit 2 like any usage error; a child of
    compare exits UNAVAILABLE_EXIT instead, so that compare records the arm as "unavailable"
    and does not try that (impl, precision) again, while any other refusal (a full disk, a
    port in use, a refused resume) stays a failure with its line."""


UNAVAILABLE_EXIT = 3
COMPARE_CHILD = "AMPCOMPARE_COMPARE_CHILD"  # set by compare in each arm's environment


def unavailable_exit() -> int:
    return UNAVAILABLE_EXIT if os.environ.get(COMPARE_CHILD) == "1" else 2
