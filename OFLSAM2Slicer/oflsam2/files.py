"""Files written whole or not at all, with the permissions a plain write would give them.

Every file oflsam2 writes (label maps, reports, weights, learner states, figures) goes
through :func:`atomic_path`: a reader never sees half a file, and a failed write leaves
the previous file as it was.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import InputError, first_line

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


def _new_temp(path: Path, suffix: str, temps: list[Path]) -> None:
    """Create an empty private file beside ``path`` and add it to ``temps``.

    The name is added before the file is created, so that a signal arriving in between
    (SIGINT, SIGTERM raise in the command line) never leaves a file nobody removes.
    """
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{suffix}")
        temps.append(tmp)
        try:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600
            )
        except FileExistsError:  # someone else's file: not ours to remove
            temps.remove(tmp)
            continue
        os.close(fd)
        return


@contextlib.contextmanager
def atomic_paths(
    paths: Sequence[str | os.PathLike], *, suffix: str | None = None
) -> Iterator[list[Path]]:
    """Temporary files beside each of ``paths``; they replace ``paths`` only if the body succeeds.

    Several outputs that belong together (a label map and its report) are written whole
    and all together, or not at all: every file is flushed and given its mode first, and
    the renames come last, one after the other. If the body raises (a failed write, an
    interrupt), every temporary file is removed and ``paths`` are left as they were.
    See :func:`atomic_path` for the names.

    Raises OSError when a folder does not exist or is not writable.
    """
    targets = [Path(p) for p in paths]
    temps: list[Path] = []
    try:
        for target in targets:
            _new_temp(target, ".tmp" + _extension(target.name) if suffix is None else suffix, temps)
        yield list(temps)
        for tmp, target in zip(temps, targets, strict=True):
            _fsync(tmp)
            os.chmod(tmp, new_file_mode(target))
        for tmp, target in zip(temps, targets, strict=True):
            os.replace(tmp, target)
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):  # gone already (renamed), or never created
                tmp.unlink()


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
    with atomic_paths([path], suffix=suffix) as (tmp,):
        yield tmp


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file (links and ``..`` resolved), existing or not."""
    with contextlib.suppress(OSError):
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def check_writable(path: str | os.PathLike, what: str) -> Path:
    """Refuse, before any work is done, an output that could not be written (InputError).

    ``path`` must not be a folder or a special file (a device, a pipe: a rename would
    replace it), nor a read-only file; its folder must exist and take a new file (tried
    by creating and removing one). Returns ``path`` as a Path.
    """
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder: give a file name inside it")
    if os.path.lexists(path) and not path.is_symlink() and not path.is_file():
        raise InputError(f"{what} {path} is not a regular file: give a file name")
    if not folder.exists():
        raise InputError(f"folder of {what} {path} does not exist: create {folder} first")
    if not folder.is_dir():
        raise InputError(f"{what} {path}: {folder} is not a folder")
    if path.is_file() and not os.access(path, os.W_OK):
        raise InputError(f"{what} {path} is read-only: choose another name or make it writable")
    temps: list[Path] = []
    try:
        _new_temp(path, ".probe", temps)
    except OSError as exc:
        reason = exc.strerror or first_line(exc)
        raise InputError(f"cannot write {what} {path}: {reason} (folder {folder})") from None
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return path


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
