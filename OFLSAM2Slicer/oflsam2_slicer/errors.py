"""Errors the user can fix, and the one place engine errors become one-line messages."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from oflsam2.errors import InputError, first_line


class OFLSAM2UserError(Exception):
    """Something the user can fix; ``str(exc)`` is one line that says what and how."""


class TaskCancelled(OFLSAM2UserError):
    """The user cancelled a background task; nothing was written."""


class PropagationCancelled(TaskCancelled):
    """The user cancelled a propagation; the segmentation was not changed."""


class DownloadCancelled(TaskCancelled):
    """The user cancelled a weights download; nothing was saved."""


def userError(exc: BaseException | None) -> OFLSAM2UserError | None:
    """The user-facing error for ``exc``, or None when it is a bug (show it with its traceback).

    The engine's :class:`~oflsam2.errors.InputError` (which includes ``WeightsError``) says
    what to fix in its first line; a missing Python package means the dependencies are not
    installed.
    """
    if isinstance(exc, OFLSAM2UserError):
        return exc
    if isinstance(exc, InputError):
        return OFLSAM2UserError(first_line(exc))
    if isinstance(exc, ImportError):
        missing = exc.name or first_line(exc)
        return OFLSAM2UserError(
            f"The OFL-SAM2 engine cannot load ({missing} is missing): install the Python dependencies"
        )
    return None


@contextmanager
def userErrors() -> Iterator[None]:
    """Re-raise engine errors the user can fix as :class:`OFLSAM2UserError`; others unchanged."""
    try:
        yield
    except Exception as exc:
        error = userError(exc)
        if error is None or error is exc:
            raise
        raise error from None


def userMessage(exc: BaseException | None) -> str:
    """One line for a status bar: the user-facing message, or the first line of a bug's error."""
    error = userError(exc)
    return str(error) if error is not None else first_line(exc)
