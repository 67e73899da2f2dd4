"""The feature cache: each slice's encoder output, float16, kept so that no slice is encoded twice.

Encoding costs seconds per slice, and a correction re-runs the walks over cached slices, so the
features of every slice the walks reach are kept. At image size 1024 a slice takes 8 MiB, so a
300-slice CT would hold 2.3 GiB in RAM. Past a RAM budget the least recently used slices live in
an anonymous temporary file instead (deleted by the OS when the cache is dropped, even after a
crash) and come back with one read, milliseconds against the seconds a walk step costs.
"""

from __future__ import annotations

import ctypes
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import torch

Features = tuple[torch.Tensor, list[torch.Tensor]]  # embedding, high-resolution maps


class FeatureCache:
    """Slice index -> (embedding, high-resolution maps), float16 on the CPU.

    ``ram_bytes`` bounds what stays in RAM (None: no bound). A slice that cannot be written to
    the temporary file (a full disk) stays in RAM: spilling only ever saves memory, never loses
    a slice.
    """

    def __init__(self, ram_bytes: int | None = None) -> None:
        self.ram_bytes = ram_bytes
        self._ram: OrderedDict[int, Features] = OrderedDict()  # least recently used first
        self._disk: dict[int, tuple[int, list[tuple[int, ...]]]] = {}  # offset, shapes
        self._file = None
        self._end = 0
        self._held = 0  # bytes in RAM
        self.spill_failed: str | None = None  # why spilling stopped, if it did

    # -- the mapping the segmenter uses
    def __contains__(self, t: object) -> bool:
        return t in self._ram or t in self._disk

    def __iter__(self) -> Iterator[int]:
        return iter(set(self._ram) | set(self._disk))

    def __len__(self) -> int:
        return len(set(self._ram) | set(self._disk))

    def __getitem__(self, t: int) -> Features:
        if t in self._ram:
            self._ram.move_to_end(t)
            return self._ram[t]
        if t not in self._disk:
            raise KeyError(t)
        value = self._read(t)
        self._keep(t, value)
        return value

    def __setitem__(self, t: int, value: Features) -> None:
        embed, hires = value
        value = (embed.to("cpu", torch.float16), [h.to("cpu", torch.float16) for h in hires])
        if t in self._ram:
            self._held -= _nbytes(self._ram.pop(t))
        self._disk.pop(t, None)  # new features replace the spilled ones
        self._keep(t, value)

    def clear(self) -> None:
        self._ram.clear()
        self._disk.clear()
        self._held = 0
        self._end = 0
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- where the bytes are
    @property
    def bytes_in_ram(self) -> int:
        return self._held

    @property
    def bytes_on_disk(self) -> int:
        return self._end

    def _keep(self, t: int, value: Features) -> None:
        self._ram[t] = value
        self._held += _nbytes(value)
        while self.ram_bytes is not None and self._held > self.ram_bytes and len(self._ram) > 1:
            old = next(iter(self._ram))
            if old not in self._disk and not self._write(old, self._ram[old]):
                break
            self._held -= _nbytes(self._ram.pop(old))

    def _write(self, t: int, value: Features) -> bool:
        if self.spill_failed is not None:
            return False
        arrays = [value[0], *value[1]]
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="oflsam2-features-")  # noqa: SIM115 (clear)
            self._file.seek(self._end)
            for a in arrays:
                self._file.write(a.contiguous().numpy().tobytes())
            self._file.flush()
        except OSError as exc:
            self.spill_failed = f"{exc.strerror or exc}"
            return False
        self._disk[t] = (self._end, [tuple(a.shape) for a in arrays])
        self._end += _nbytes(value)
        return True

    def _read(self, t: int) -> Features:
        offset, shapes = self._disk[t]
        buf = bytearray(sum(int(np.prod(s)) * 2 for s in shapes))
        self._file.seek(offset)
        got = self._file.readinto(buf)
        if got != len(buf):  # the OS lost our file's tail: a bug or a broken disk, never silence
            raise OSError(f"the feature cache file returned {got} of {len(buf)} bytes")
        arrays, at = [], 0
        for s in shapes:
            n = int(np.prod(s)) * 2
            arrays.append(torch.from_numpy(np.frombuffer(buf, np.float16, n // 2, at).reshape(s)))
            at += n
        return arrays[0], arrays[1:]


def _nbytes(value: Features) -> int:
    return value[0].numel() * 2 + sum(h.numel() * 2 for h in value[1])


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc only; elsewhere nothing happens).

    glibc keeps what a fit or an encoder batch freed: a fit at 1024 left about 0.5 GiB resident
    that nothing uses, on top of which the cache then grows.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # musl and others: no glibc heap to trim
        return None


_LIBC = _glibc()
