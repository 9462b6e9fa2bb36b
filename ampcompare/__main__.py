"""`ampcompare` and `python -m ampcompare`. Ctrl-C, SIGTERM and SIGHUP are handled before
anything heavy is imported (torch takes a second or two), so that an interrupt at any moment
ends with one line and exit 130, never a traceback."""

import os
import sys


def main() -> None:
    from common import ranks
    from record import signals  # the standard library only

    signals.install()
    try:  # before torch is imported: its OpenMP runtime prints its own complaint first
        ranks.threads()
    except ValueError as e:
        print(f"ampcompare: error: {e}", file=sys.stderr)
        sys.exit(2)
    if ranks.launched():  # a rank of a job: it ends with the launcher that started it
        signals.die_with_parent()
    try:
        from ampcompare.cli import cli

        cli.main()  # exits with the code the record says
    except KeyboardInterrupt:  # while torch and the rest were still being imported
        if ranks.is_rank0():  # a job's other ranks leave the line to rank 0
            print("ampcompare: interrupted", file=sys.stderr)
        sys.exit(signals.interrupted_exit())
    except SystemExit as end:
        if not ranks.launched() and end.code != 130:
            raise
        # A rank of a job, its part done and recorded, or a command stopped by a signal once it
        # has written what it measured: leave without the interpreter's teardown, in which
        # torch's threads sometimes ended a finished process with SIGABRT (docs/failures.md).
        signals.block_for_exit()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a reader that went away
                pass
        os._exit(end.code if isinstance(end.code, int) else 1)
    finally:
        signals.block_for_exit()  # from here to the exit, nothing may change that code


if __name__ == "__main__":
    main()
