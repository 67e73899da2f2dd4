"""Learner files: a trained learner and everything needed to apply it to a new volume.

A learner file is a plain ``.npz`` (a zip of ``.npy`` arrays) read with
``allow_pickle=False``: one float array per learner tensor (``seg<value>/<name>``) and
``meta.json``, the metadata as UTF-8 bytes. Nothing in it can run code, so a file from a
colleague or the internet is safe to open. The zip is written with fixed timestamps and
sorted names, so saving a loaded file again gives the same bytes.

The metadata says what the tensors only work with: the backbone and its weights, the image
size, the intensity-window rule (and its values where they are fixed), the crop rule, the
slice axis, the segments (value, name, colour), a training summary and the versions.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, first_line
from .files import atomic_path

FORMAT = "oflsam2-learner-2"
META = "meta.json"
SUFFIX = ".oflsam2"  # what `oflsam2 train` suggests; any name is accepted
_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed zip timestamps: the same learner gives the same bytes
_PICKLE_MAGIC = (b"\x80", b"(", b"c", b"]", b"}")  # pickle protocol 2+ and old text protocols


@dataclass
class LearnerFile:
    """The tensors of one learner per segment value, and the metadata to apply them."""

    tensors: dict[int, dict[str, np.ndarray]]  # segment value -> state dict as numpy arrays
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def values(self) -> list[int]:
        return sorted(self.tensors)

    @property
    def names(self) -> dict[int, str]:
        """Segment value -> name (``segment <value>`` where the file names none)."""
        named = {int(s["value"]): s.get("name") for s in self.meta.get("segments", [])}
        return {v: named.get(v) or f"segment {v}" for v in self.values}

    @property
    def colors(self) -> dict[int, tuple[float, float, float]]:
        out = {}
        for s in self.meta.get("segments", []):
            if s.get("color") is not None:
                out[int(s["value"])] = tuple(float(c) for c in s["color"])
        return out

    @property
    def axis(self) -> int:
        return int(self.meta.get("axis", {}).get("index", 0))

    @property
    def modality(self) -> str | None:
        return self.meta.get("window", {}).get("modality")

    def describe(self) -> str:
        """One line: the backbone, the segments and what the learner was trained on."""
        names = ", ".join(f"{v}: {n}" for v, n in self.names.items())
        train = self.meta.get("training", {})
        return (
            f"{self.meta.get('backbone')} learner for {{{names}}}, trained on "
            f"{len(train.get('volumes', []))} volume(s), {self.modality or 'any'} window"
        )


def _state_arrays(state: dict[str, Any]) -> dict[str, np.ndarray]:
    """A torch state dict (or numpy arrays) as contiguous numpy arrays."""
    out = {}
    for name, value in state.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        out[name] = np.ascontiguousarray(value)
    return out


def to_bytes(learner: LearnerFile) -> bytes:
    """The file's bytes: deterministic for the same tensors and metadata."""
    entries: dict[str, np.ndarray] = {}
    for value, state in learner.tensors.items():
        for name, array in _state_arrays(state).items():
            if array.dtype == object:
                raise ValueError(f"tensor {name} of segment {value} is not numeric")
            entries[f"seg{int(value)}/{name}.npy"] = array
    text = json.dumps(learner.meta, indent=1, sort_keys=True, allow_nan=False).encode("utf-8")
    entries[META + ".npy"] = np.frombuffer(text, dtype=np.uint8)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            npy = io.BytesIO()
            np.lib.format.write_array(npy, entries[name], allow_pickle=False)
            zf.writestr(info, npy.getvalue())
    return buffer.getvalue()


def save(learner: LearnerFile, path: str | Path) -> Path:
    """Write ``learner`` to ``path`` whole or not at all."""
    path = Path(path)
    data = to_bytes(learner)
    try:
        with atomic_path(path, suffix=".tmp") as tmp:
            tmp.write_bytes(data)
    except OSError as exc:
        raise InputError(f"cannot write learner file {path}: {exc.strerror or exc}") from None
    return path


def _refuse(path: Path, why: str) -> InputError:
    return InputError(
        f"{path} is not an oflsam2 learner file ({why}): give a file saved by `oflsam2 train` "
        "or Slicer's Save learner"
    )


def read_bytes(path: Path) -> bytes:
    """The bytes of a learner file; InputError when there is none to read."""
    if not path.exists():
        raise InputError(f"learner file {path} does not exist: check the path")
    if path.is_dir():
        raise InputError(f"learner file {path} is a folder: give the learner file inside it")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read learner file {path}: {exc.strerror or exc}") from None


def from_bytes(data: bytes, path: str | Path = "learner file") -> LearnerFile:
    """Parse a learner file without ever unpickling; InputError (one line) on anything else."""
    path = Path(path)
    if not data:
        raise _refuse(path, "it is empty")
    if data[:1] in _PICKLE_MAGIC and not data.startswith(b"PK"):
        raise InputError(
            f"{path} is a Python pickle: oflsam2 never loads pickles (they can run code); "
            "give a learner file saved by `oflsam2 train` or Slicer's Save learner"
        )
    try:
        npz = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises many kinds on foreign files
        raise _refuse(path, first_line(exc, 80)) from None
    try:
        with npz:
            names = list(npz.files)
            if any(n.endswith(".pkl") for n in names):  # a torch checkpoint is a zip too
                raise InputError(
                    f"{path} holds a Python pickle (a torch checkpoint?): oflsam2 never loads "
                    "pickles; give a learner file saved by `oflsam2 train` or Slicer's Save learner"
                )
            if META not in names:
                raise _refuse(path, f"no {META} in it")
            arrays = {name: npz[name] for name in names}
    except InputError:
        raise
    except ValueError as exc:  # an object array: numpy refuses to unpickle it
        if "pickle" in str(exc).lower():
            raise InputError(
                f"{path} holds pickled objects: oflsam2 never loads pickles (they can run code)"
            ) from None
        raise _refuse(path, first_line(exc, 80)) from None
    except Exception as exc:  # noqa: BLE001 - a truncated or corrupt zip
        raise _refuse(path, f"corrupt: {first_line(exc, 80)}") from None
    return _parse(arrays, path)


def _parse(arrays: dict[str, np.ndarray], path: Path) -> LearnerFile:
    try:
        meta = json.loads(bytes(arrays.pop(META)).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _refuse(path, f"unreadable metadata: {first_line(exc, 60)}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise _refuse(path, f"format {found!r}, expected {FORMAT!r}")
    tensors: dict[int, dict[str, np.ndarray]] = {}
    for name, array in arrays.items():
        head, _, key = name.partition("/")
        if not head.startswith("seg") or not head[3:].isdigit() or not key:
            raise _refuse(path, f"unexpected entry {name!r}")
        tensors.setdefault(int(head[3:]), {})[key] = array
    declared = sorted(int(s["value"]) for s in meta.get("segments", []))
    if not tensors or sorted(tensors) != declared:
        raise _refuse(path, f"segments {sorted(tensors)} do not match the metadata's {declared}")
    return LearnerFile(tensors, meta)


def load(path: str | Path) -> LearnerFile:
    """Read a learner file (see :func:`from_bytes`)."""
    path = Path(path)
    return from_bytes(read_bytes(path), path)


def check_backbone(
    learner: LearnerFile, backbone: str, model: str | None, path: str | Path = "learner file"
) -> None:
    """Refuse, in one line, a learner made for another backbone or model than the one asked for."""
    want = learner.meta.get("backbone")
    want_model = learner.meta.get("model")
    if backbone != want:
        raise InputError(
            f"{path} was trained for backbone {want} ({want_model}), not {backbone}: "
            f"apply it with --backbone {want}, or train a learner for {backbone}"
        )
    if model is not None and want_model is not None and model != want_model:
        raise InputError(
            f"{path} was trained for {want} model {want_model}, not {model}: "
            f"apply it with --model {want_model}, or train a learner for {model}"
        )
