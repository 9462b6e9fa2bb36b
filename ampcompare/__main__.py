"""`ampcompare` and `python -m ampcompare`. Ctrl-C and SIGTERM are handled before anything heavy
is imported (torch takes a second or two), so that an interrupt at any moment ends with one
line and exit 130, never a traceback."""
import os
import sys


def main() -> None:
    from common import signals  # the standard library only

    signals.install()
    if "LOCAL_RANK" in os.environ:  # a rank of a job: it ends with the launcher that started it
        signals.die_with_parent()
    try:
        from ampcompare.cli import cli
    except KeyboardInterrupt:
        print("ampcompare: interrupted", file=sys.stderr)
        sys.exit(130)
    cli.main()


if __name__ == "__main__":
    main()
