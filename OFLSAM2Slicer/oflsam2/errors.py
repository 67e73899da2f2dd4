"""Error types the command line maps to exit codes, and how an error is shown in one line."""


class InputError(ValueError):
    """Bad input from the user: reported as one line, exit code 2."""


class WeightsError(InputError):
    """Weights missing, corrupt or not downloadable: the message says how to fix it."""


class Cancelled(RuntimeError):
    """The user cancelled a running job; nothing was written."""


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
