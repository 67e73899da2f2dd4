"""The ``oflsam2`` command line.

Exit codes: 0 success, 2 bad input (one line on stderr), 1 internal error
(traceback only with ``--debug``), 130 interrupted (SIGINT, Ctrl-C), 143 terminated
(SIGTERM, what ``timeout`` and batch schedulers send). An interrupted or terminated run
removes its temporary files and leaves every output as it was.
"""

from __future__ import annotations

import os
import sys

_SIGINT, _SIGTERM = 2, 15  # the same on every system Python runs on


def _message(signum: int) -> str:
    what = "terminated (SIGTERM)" if signum == _SIGTERM else "interrupted"
    return f"oflsam2: {what}; nothing was written"


def _quiet_hook(kind, value, tb, _previous=sys.excepthook) -> None:
    """Ctrl-C or SIGTERM while Python is still importing, before main() runs: one line."""
    errors = sys.modules.get("oflsam2.errors")
    noted = errors.signalled() if errors is not None else None
    if issubclass(kind, KeyboardInterrupt) or noted is not None:
        signum = getattr(value, "signum", noted or _SIGINT)
        print(_message(signum), file=sys.stderr, flush=True)
        os._exit(128 + signum)
    _previous(kind, value, tb)


_COMMAND = __name__ == "__main__" or os.path.basename(sys.argv[0]) in ("oflsam2", "oflsam2.exe")
if _COMMAND:  # the command itself, not a host importing this module: quiet from here on
    sys.excepthook = _quiet_hook

import signal  # noqa: E402 - after the hook: a signal during the imports below is quiet

from .errors import Interrupted, note_signal  # noqa: E402


def _raise_interrupted(signum: int, frame) -> None:
    note_signal(signum)
    raise Interrupted(signum)


if _COMMAND:
    for _sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(_sig) is not signal.SIG_IGN:
            signal.signal(_sig, _raise_interrupted)

import argparse  # noqa: E402 - after the handlers, so that a signal during imports is quiet
import contextlib  # noqa: E402
import traceback  # noqa: E402

from . import __version__  # noqa: E402
from .errors import Cancelled, InputError, signalled  # noqa: E402


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
        epilog=(
            "Exit codes: 0 done, 2 bad input (one line on stderr), 1 internal error, "
            "130 interrupted (Ctrl-C), 143 terminated (SIGTERM); an interrupted run writes nothing."
        ),
    )
    p.add_argument("--version", action="version", version=f"oflsam2 {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    from . import commands

    commands.register(sub)
    return p


@contextlib.contextmanager
def _signals_raise():
    """SIGINT and SIGTERM raise :class:`Interrupted` while the command runs, so that every
    ``finally`` (temporary files) runs; the previous handlers come back afterwards."""
    previous = {}
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue  # `nohup`, a background job: the caller asked to ignore it
            previous[sig] = signal.signal(sig, _raise_interrupted)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    note_signal(None)
    try:
        with _signals_raise():
            return _run(argv)
    except SystemExit:  # --help, --version
        raise
    except BaseException as exc:  # noqa: BLE001 - every outcome becomes an exit code here
        return _exit_code(exc, debug="--debug" in argv)
    finally:
        note_signal(None)


def _exit_code(exc: BaseException, debug: bool) -> int:
    """Report how the command ended, in one line on stderr; the exit code."""
    signum = exc.signum if isinstance(exc, Interrupted) else signalled()
    if signum is None and isinstance(exc, KeyboardInterrupt):
        signum = _SIGINT
    if signum is not None:  # also when a signal surfaced as another error (inside an import)
        print(_message(signum), file=sys.stderr)
        return 128 + signum
    if isinstance(exc, InputError):
        print(f"oflsam2: error: {exc}", file=sys.stderr)
        return 2
    if isinstance(exc, Cancelled):
        print(f"oflsam2: cancelled: {exc}", file=sys.stderr)
        return 1
    if isinstance(exc, BrokenPipeError):  # `oflsam2 weights list | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if not isinstance(exc, Exception):
        raise exc
    if debug:
        traceback.print_exception(exc)
    print(
        f"oflsam2: internal error: {type(exc).__name__}: {exc} (run again with --debug for details)",
        file=sys.stderr,
    )
    return 1


def _run(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
