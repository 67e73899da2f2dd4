"""The ``oflsam2`` command line.

Exit codes: 0 success, 2 bad input (one line on stderr), 1 internal error
(traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import sys
import traceback

from . import __version__
from .errors import Cancelled, InputError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors are bad input too
        raise InputError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="oflsam2",
        description=(
            "Segment a whole CT or MR volume from a few painted slices with OFL-SAM2 "
            "(a frozen SAM2 prompted by an online few-shot learner)."
        ),
    )
    p.add_argument("--version", action="version", version=f"oflsam2 {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    from . import commands

    commands.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"oflsam2: error: {exc}", file=sys.stderr)
        return 2
    except Cancelled as exc:
        print(f"oflsam2: cancelled: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `oflsam2 weights list | head`: the reader left, nothing is wrong
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("oflsam2: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place internal errors are reported
        if debug:
            traceback.print_exc()
        print(
            f"oflsam2: internal error: {type(exc).__name__}: {exc} (run again with --debug for details)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
