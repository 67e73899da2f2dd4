"""Error types the command line maps to exit codes, and how an error is shown in one line."""


class InputError(ValueError):
    """Bad input from the user: reported as one line, exit code 2."""


class WeightsError(InputError):
    """Weights missing, corrupt or not downloadable: the message says how to fix it."""


class Cancelled(RuntimeError):
    """The user cancelled a running job; nothing was written."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (the command line turns both into this): the stack unwinds,
    temporary files are removed on the way, and the exit code is 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        name = {2: "SIGINT", 15: "SIGTERM"}.get(signum, f"signal {signum}")
        super().__init__(name)
        self.signum = signum
        self.name = name


# The signal that interrupted the running command (set by the command line's handler).
_signalled: list[int] = []


def note_signal(signum: int | None) -> None:
    """Remember that ``signum`` arrived (None: forget it, for the next command)."""
    _signalled.clear()
    if signum is not None:
        _signalled.append(signum)


def signalled() -> int | None:
    return _signalled[0] if _signalled else None


def check_interrupted() -> None:
    """Raise :class:`Interrupted` if a signal arrived but a library swallowed its exception
    (some catch everything while importing): called between stages and before outputs are
    committed, so that a signal is never lost."""
    if _signalled:
        raise Interrupted(_signalled[0])


def first_line(exc: BaseException | None, limit: int | None = 160) -> str:
    """An exception's message cut to its first line (at most ``limit`` characters), for
    one-line errors; the exception's type name when the message is empty."""
    if exc is None:
        return "unknown error"
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0].strip()
    return line if limit is None else line[:limit].rstrip()
