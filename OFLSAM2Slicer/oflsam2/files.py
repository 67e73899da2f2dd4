"""Files written whole or not at all, with the permissions a plain write would give them.

Every file oflsam2 writes (label maps, reports, weights, learner states, figures) goes
through :func:`atomic_path`: a reader never sees half a file, and a failed write leaves
the previous file as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Extensions of two parts: writers that pick a format from the name need both.
_DOUBLE_SUFFIXES = (".nii.gz", ".seg.nrrd")


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows.

    ``os.umask`` can only be read by setting it; between the two calls another thread
    would create files with the wrong permissions, so Linux's /proc is asked first.
    """
    with (
        contextlib.suppress(OSError, ValueError),
        open("/proc/self/status", encoding="ascii", errors="replace") as fh,
    ):
        for line in fh:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def new_file_mode(path: str | os.PathLike | None = None) -> int:
    """Permissions for a file written to ``path``: those of the file already there, else
    0o666 less the umask (what ``open`` would give; ``mkstemp`` makes 0600 files)."""
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            return os.stat(path).st_mode & 0o7777
    return 0o666 & ~current_umask()


def _extension(name: str) -> str:
    lower = name.lower()
    for double in _DOUBLE_SUFFIXES:
        if lower.endswith(double):
            return name[-len(double) :]
    return Path(name).suffix


def _fsync(path: Path) -> None:
    # Read-write: Windows cannot flush a file opened read-only.
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str | None = None) -> Iterator[Path]:
    """A temporary file beside ``path`` for the body to write; on success it becomes ``path``.

    On a normal exit the temporary file is flushed to disk, given :func:`new_file_mode`
    (the replaced file's permissions, else the umask's) and renamed onto ``path`` in one
    step; if the body raises, it is removed and ``path`` is left as it was. The temporary
    name is ``.NAME.<random><suffix>`` in ``path``'s folder (the rename never crosses file
    systems); ``suffix`` defaults to ``.tmp`` plus ``path``'s extension, so writers that pick
    the format from the name (SimpleITK, matplotlib, numpy) write the right one.

    Raises OSError when the folder does not exist or is not writable.
    """
    path = Path(path)
    if suffix is None:
        suffix = ".tmp" + _extension(path.name)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, new_file_mode(path))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
