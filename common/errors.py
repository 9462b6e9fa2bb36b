"""Errors the CLI turns into one line and an exit code instead of a traceback."""


class UsageError(Exception):
    """Bad option or missing environment piece (exit 2). The message is the one line shown."""
