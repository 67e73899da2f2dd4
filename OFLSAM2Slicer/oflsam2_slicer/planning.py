"""What to propagate, worked out from arrays only (no MRML): testable with plain numpy.

Given each chosen segment as a 0/1 array on the volume's grid and what the last propagation
wrote into it, this module tells the user's paint from propagated slices, picks the slice
axis, checks that the paint lies on slices of that axis, limits the slices to a range,
groups segments painted on the same slices (one fit each), and merges the engine's labels
back into full-grid masks that keep every painted slice as the user left it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from oflsam2.volume import find_annotated, slices_with_labels

from .errors import OFLSAM2UserError, userErrors

ORIENTATIONS = ("sagittal", "coronal", "axial")  # slice normal along R, A, S

# ---------------------------------------------------------------- geometry


def _sliceNormal(ijkToRas: np.ndarray, axis: int) -> np.ndarray:
    """Normal (RAS) of the slices across array axis ``axis`` (k, j, i order)."""
    return np.cross(ijkToRas[:3, (2 - axis + 1) % 3], ijkToRas[:3, (2 - axis + 2) % 3])


def orientationOfAxis(ijkToRas: np.ndarray, axis: int) -> str:
    """Anatomical name of the slices across array axis ``axis`` (k, j, i order); oblique: closest."""
    return ORIENTATIONS[int(np.argmax(np.abs(_sliceNormal(ijkToRas, axis))))]


def arrayAxisFor(orientation: str, ijkToRas: np.ndarray) -> int:
    """Array axis whose slices are closest to ``orientation`` (axial, coronal or sagittal)."""
    scores = []
    for axis in range(3):
        normal = _sliceNormal(ijkToRas, axis)
        normal = normal / max(np.linalg.norm(normal), 1e-12)
        scores.append(abs(normal[ORIENTATIONS.index(orientation)]))
    return int(np.argmax(scores))


def take(axis: int, index: Any) -> tuple:
    """Index of ``index`` (an int, a slice or a list) along ``axis`` of a 3D array."""
    idx: list[Any] = [slice(None)] * 3
    idx[axis] = index
    return tuple(idx)


def isSliced(occupied: np.ndarray) -> bool:
    """Paint lies on separate slices along this axis: a single slice, or gaps between slices."""
    return len(occupied) == 1 or (
        len(occupied) > 1 and len(occupied) < occupied[-1] - occupied[0] + 1
    )


# ---------------------------------------------------------------- paint vs. propagated


@dataclass(frozen=True)
class WriteMemory:
    """What the last propagation wrote into one segment, to tell propagated slices from paint."""

    axis: int
    annotated: frozenset[int]
    bits: np.ndarray  # np.packbits of the written mask
    shape: tuple[int, ...]

    @classmethod
    def of(cls, axis: int, annotated: Sequence[int], mask: np.ndarray) -> WriteMemory:
        return cls(
            axis=axis,
            annotated=frozenset(annotated),
            bits=np.packbits(mask.ravel()),
            shape=mask.shape,
        )

    def mask(self) -> np.ndarray:
        count = int(np.prod(self.shape))
        return np.unpackbits(self.bits, count=count).reshape(self.shape).astype(bool)


def paintOf(
    current: np.ndarray, memory: WriteMemory | None
) -> tuple[np.ndarray, WriteMemory | None, list[int]]:
    """The user's annotation inside a segment that may hold an earlier propagation.

    Returns the paint, the memory it relied on (None: the whole segment is paint) and the
    annotated slices along the memory's axis. Slices the last propagation wrote that nobody
    touched since are not annotation; slices painted then, or corrected since (even
    erased), are. When none of the propagated slices survives (undone, or all redone by
    hand) the memory is stale and ignored.
    """
    if memory is None or memory.shape != current.shape:
        return current, None, []
    before = memory.mask()
    axis = memory.axis
    changed = {int(t) for t in slices_with_labels(before != current.astype(bool), axis)}
    propagated = [
        int(t) for t in slices_with_labels(before, axis) if int(t) not in memory.annotated
    ]
    if propagated and all(t in changed for t in propagated):
        return current, None, []
    keep = sorted(set(memory.annotated) | changed)
    paint = np.zeros_like(current)
    paint[take(axis, keep)] = current[take(axis, keep)]
    return paint, memory, keep


# ---------------------------------------------------------------- slice axis


def _namedAxis(choice: str | int, ijkToRas: np.ndarray) -> int | None:
    """The array axis the user named (0..2 or an orientation), or None for automatic."""
    if isinstance(choice, str) and choice.isdigit():
        choice = int(choice)
    if isinstance(choice, int):
        if choice not in (0, 1, 2):
            raise OFLSAM2UserError(
                f"Slice axis must be auto, axial, coronal, sagittal or 0..2, not {choice}"
            )
        return choice
    name = str(choice).lower()
    if name in ORIENTATIONS:
        return arrayAxisFor(name, ijkToRas)
    if name != "auto":
        raise OFLSAM2UserError(
            f"Slice axis must be auto, axial, coronal or sagittal, not '{choice}'"
        )
    return None


def resolveAxis(
    paints: Mapping[str, np.ndarray],
    memories: Mapping[str, WriteMemory | None],
    choice: str | int,
    ijkToRas: np.ndarray,
) -> tuple[int, bool]:
    """The array axis of the painted slices, and whether the user named it.

    Automatic: the axis of the last propagation when all segments agree on one, else the
    axis along which the paint of all segments occupies the fewest slices.
    """
    named = _namedAxis(choice, ijkToRas)
    if named is not None:
        return named, True
    remembered = {m.axis for m in memories.values() if m is not None}
    if len(remembered) == 1:
        return remembered.pop(), False
    union = np.zeros_like(next(iter(paints.values())))
    for paint in paints.values():
        union |= paint
    with userErrors():
        return find_annotated(union, "auto").axis, False


def _otherAxis(paint: np.ndarray, axis: int) -> int | None:
    """The axis this segment is evidently painted along instead of ``axis``, or None if it fits."""
    occupied = [slices_with_labels(paint, a) for a in range(3)]
    counts = [len(o) for o in occupied]
    if isSliced(occupied[axis]) or counts[axis] <= min(counts):
        return None
    other = [
        b for b in range(3) if b != axis and counts[b] < counts[axis] and isSliced(occupied[b])
    ]
    return min(other, key=lambda b: counts[b]) if other else None


def checkPaintAxis(
    paints: Mapping[str, np.ndarray],
    names: Mapping[str, str],
    axis: int,
    explicit: bool,
    ijkToRas: np.ndarray,
) -> None:
    """Painted slices must be parallel to the slice axis; say which segment is not, and how to fix it."""
    others = {sid: _otherAxis(paint, axis) for sid, paint in paints.items()}
    misfits = [(sid, b) for sid, b in others.items() if b is not None]
    if not misfits:
        return
    fits = [sid for sid, b in others.items() if b is None]
    sid, b = misfits[0]
    here, there = orientationOfAxis(ijkToRas, axis), orientationOfAxis(ijkToRas, b)
    if explicit:
        raise OFLSAM2UserError(
            f"Segment '{names[sid]}' is painted on {there} slices but the slice axis is set to "
            f"{here}: set the slice axis to {there} or automatic"
        )
    fitting = f"'{names[fits[0]]}' ({here})" if fits else f"the others ({here})"
    raise OFLSAM2UserError(
        f"Segments {fitting} and '{names[sid]}' ({there}) are painted on different slice "
        "orientations: paint them on the same orientation or propagate them one at a time"
    )


# A stroke in another view: at least this many voxels, one voxel thin across that view's
# slices, and the only paint on at least this many slices of the propagation's axis.
SHEET_VOXELS = 16
SHEET_SLICES = 4


def _thin(paint: np.ndarray, axis: int) -> np.ndarray:
    """Painted voxels whose two neighbours along ``axis`` are not painted (a one-voxel sheet)."""
    p = paint.astype(bool)
    n = p.shape[axis]
    covered = np.zeros_like(p)
    if n > 1:
        covered[take(axis, slice(1, n))] |= p[take(axis, slice(0, n - 1))]
        covered[take(axis, slice(0, n - 1))] |= p[take(axis, slice(1, n))]
    return p & ~covered


def crossAxis(paint: np.ndarray, axis: int) -> int | None:
    """Another array axis this segment is also painted along (a stroke in another view), or None.

    Paint on slices across ``axis`` is one voxel thin along ``axis`` where the painted slices
    have gaps. A stroke drawn in another view is one voxel thin along that view's axis, and
    it is all there is on the slices of ``axis`` it crosses between the painted ones: each of
    those would count as "annotated" (and cut the propagation there) without this check. A
    fully painted segment is not refused: its slices hold more than thin lines.
    """
    occupied = np.nonzero(paint)
    if not occupied[0].size:
        return None
    box = tuple(slice(int(o.min()), int(o.max()) + 1) for o in occupied)
    paint = paint[box].astype(bool)
    inPlane = tuple(a for a in range(3) if a != axis)
    perSlice = np.count_nonzero(paint, axis=inPlane)
    thinHere = _thin(paint, axis)
    for other in inPlane:
        sheet = _thin(paint, other) & ~thinHere
        if np.count_nonzero(sheet) < SHEET_VOXELS:
            continue
        onlySheet = (perSlice > 0) & (np.count_nonzero(sheet, axis=inPlane) == perSlice)
        if np.count_nonzero(onlySheet) >= SHEET_SLICES:
            return other
    return None


def checkSingleOrientation(
    paints: Mapping[str, np.ndarray], names: Mapping[str, str], axis: int, ijkToRas: np.ndarray
) -> None:
    """Each segment's paint lies on slices of one orientation; else say which two and how to fix it."""
    for sid, paint in paints.items():
        other = crossAxis(paint, axis)
        if other is not None:
            here, there = orientationOfAxis(ijkToRas, axis), orientationOfAxis(ijkToRas, other)
            raise OFLSAM2UserError(
                f"Segment '{names[sid]}' is painted on both {here} and {there} slices: erase "
                "the strokes of one orientation and press Propagate again"
            )


def sliceWindow(count: int, sliceRange: tuple[int, int] | None) -> tuple[int, int]:
    """First and last slice (inclusive) to propagate among ``count``, within ``sliceRange``."""
    if sliceRange is None:
        return 0, count - 1
    first, last = (int(v) for v in sliceRange)
    lo, hi = max(0, min(first, last)), min(count - 1, max(first, last))
    if lo > hi:
        raise OFLSAM2UserError(
            f"Slice range {first}..{last} lies outside the volume's slices 0..{count - 1}"
        )
    return lo, hi


# ---------------------------------------------------------------- the layout of a propagation


@dataclass(frozen=True)
class Layout:
    """Where each segment's paint lies: the slice axis, the slice window, the annotated slices."""

    axis: int  # array axis (0 = k, 1 = j, 2 = i) of the slices
    orientation: str  # axial, coronal or sagittal (closest anatomical name of that axis)
    lo: int  # first slice to propagate (inclusive)
    hi: int  # last slice to propagate (inclusive)
    paints: dict[str, np.ndarray]  # segment -> the user's paint on the full grid
    annotated: dict[str, list[int]]  # segment -> slices taken as the user's annotation

    @property
    def window(self) -> tuple:
        """Index of the propagated slices in a full-grid array."""
        return take(self.axis, slice(self.lo, self.hi + 1))


def _annotation(
    original: np.ndarray, paint: np.ndarray, memory: WriteMemory | None, kept: list[int], axis: int
) -> tuple[np.ndarray, list[int]]:
    """A segment's paint and annotated slices along ``axis``."""
    if memory is not None and memory.axis == axis:
        return paint, kept
    if memory is not None:  # the axis changed: treat everything in the segment as paint
        paint = original
    return paint, [int(t) for t in slices_with_labels(paint, axis)]


def findLayout(
    originals: Mapping[str, np.ndarray],
    memories: Mapping[str, WriteMemory | None],
    names: Mapping[str, str],
    axisChoice: str | int,
    sliceRange: tuple[int, int] | None,
    ijkToRas: np.ndarray,
) -> Layout:
    """Work out the paint, axis, window and annotated slices of the segments in ``originals``."""
    paints, used, kept = {}, {}, {}
    for sid, original in originals.items():
        paints[sid], used[sid], kept[sid] = paintOf(original, memories.get(sid))
    axis, explicit = resolveAxis(paints, used, axisChoice, ijkToRas)
    checkPaintAxis(paints, names, axis, explicit, ijkToRas)
    checkSingleOrientation(paints, names, axis, ijkToRas)
    lo, hi = sliceWindow(next(iter(originals.values())).shape[axis], sliceRange)
    annotated = {}
    for sid, original in originals.items():
        paints[sid], annotated[sid] = _annotation(original, paints[sid], used[sid], kept[sid], axis)
        inside = [t for t in annotated[sid] if lo <= t <= hi]
        if not any(paints[sid][take(axis, t)].any() for t in inside):
            where = f"within slices {lo}..{hi}" if sliceRange is not None else "on any slice"
            raise OFLSAM2UserError(
                f"Segment '{names[sid]}' has no painted slice {where}: paint it first"
            )
    return Layout(
        axis=axis,
        orientation=orientationOfAxis(ijkToRas, axis),
        lo=lo,
        hi=hi,
        paints=paints,
        annotated=annotated,
    )


# ---------------------------------------------------------------- groups and merging


@dataclass
class Group:
    """Segments painted on the same slices: one fit + propagate (their empty slices mean 'absent')."""

    segmentIds: list[str]
    values: list[int]  # the label value of each segment in ``sparse`` and in the engine's output
    slices: list[int]  # annotated slices, in window coordinates
    sparse: np.ndarray  # uint8 on the window's grid


def groupSegments(ids: Sequence[str], layout: Layout) -> list[Group]:
    """One group per set of annotated slices inside the window; segment i gets label i + 1."""
    groups: dict[tuple[int, ...], Group] = {}
    for index, sid in enumerate(ids):
        paint = layout.paints[sid][layout.window]
        inside = tuple(t - layout.lo for t in layout.annotated[sid] if layout.lo <= t <= layout.hi)
        group = groups.get(inside)
        if group is None:
            group = groups[inside] = Group(
                segmentIds=[],
                values=[],
                slices=list(inside),
                sparse=np.zeros(paint.shape, np.uint8),
            )
        group.segmentIds.append(sid)
        group.values.append(index + 1)
        group.sparse[paint > 0] = index + 1
    return list(groups.values())


def merge(
    layout: Layout,
    groups: Sequence[Group],
    labels: Sequence[np.ndarray],
    originals: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Full-grid masks: engine labels inside the window, originals outside it and on painted slices."""
    if len(labels) != len(groups):
        raise RuntimeError(f"the engine returned {len(labels)} results for {len(groups)} groups")
    out: dict[str, np.ndarray] = {}
    for group, result in zip(groups, labels, strict=True):
        result = np.asarray(result)
        if result.shape != group.sparse.shape:
            raise RuntimeError(
                f"the engine returned labels of shape {result.shape}, expected {group.sparse.shape}"
            )
        for sid, value in zip(group.segmentIds, group.values, strict=True):
            original = originals[sid]
            mask = original.copy()
            mask[layout.window] = result == value
            keep = take(layout.axis, layout.annotated[sid])
            if layout.annotated[sid]:
                mask[keep] = original[keep]
            out[sid] = mask
    return out


def slicesChanged(new: np.ndarray, original: np.ndarray, axis: int) -> int:
    """How many slices along ``axis`` differ between two masks."""
    return len(slices_with_labels(new != original, axis))
