"""After a propagation: the slice to paint next and the confidence slice by slice (no Qt).

:func:`nextSlice` ranks the unpainted slices of each fitted group with
:func:`oflsam2.guidance.rank_slices` and keeps the best of all groups (by expected wrong voxels
removed), as a slice index of the full volume and a point on that slice for the slice views to
jump to. :class:`SliceConfidence` is the engine's per-slice confidence on the full volume (the
least confident group wins a slice) and draws it as a one-line bar for the panel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from oflsam2.guidance import rank_slices

BAR_WIDTH = 60  # characters of the confidence bar at most; longer volumes are binned
LEVELS = "▁▂▃▄▅▆▇█"  # confidence 0..1
PAINTED = "◆"
NOT_PREDICTED = "·"
UNSURE = 0.5  # below this confidence a slice is named as one to review


@dataclass(frozen=True)
class NextSlice:
    """The slice the user should paint next."""

    axis: int  # array axis (0 = k, 1 = j, 2 = i)
    orientation: str  # axial, coronal or sagittal
    index: int  # slice index along ``axis`` in the full volume
    score: float  # share (0..1) of the expected error painting it should remove
    ras: tuple[float, float, float]  # a point on that slice: the predicted segment's centre
    alternatives: tuple[int, ...] = ()  # the next best slices, best first

    def text(self) -> str:
        return f"Paint {self.orientation} slice {self.index} next"

    def details(self) -> str:
        """A tooltip: why this slice, and the runners-up."""
        more = ", ".join(str(t) for t in self.alternatives)
        also = f"; then {more}" if more else ""
        return (
            f"Painting {self.orientation} slice {self.index} should remove about "
            f"{self.score:.0%} of the result's expected error (low confidence, disagreement "
            f"between the walks from the painted slices on either side, distance to the "
            f"nearest painted slice, size of the segment there){also}."
        )


@dataclass(frozen=True)
class SliceConfidence:
    """The engine's confidence per slice along ``axis`` of the full volume (nan: not predicted)."""

    axis: int
    orientation: str
    values: np.ndarray  # (slices,) in 0..1, nan where nothing was predicted
    painted: tuple[int, ...]  # slices painted for any chosen segment
    lo: int  # the propagated window
    hi: int

    def _bins(self, width: int) -> list[tuple[int, int]]:
        n = self.hi - self.lo + 1
        count = min(n, width)
        edges = np.linspace(self.lo, self.hi + 1, count + 1).round().astype(int)
        return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]

    def cells(self, width: int = BAR_WIDTH) -> list[tuple[str, float | None]]:
        """One (character, confidence or None) per bin of slices: the bin's lowest
        confidence, a painted mark where a painted slice falls, a dot where none is predicted."""
        painted = set(self.painted)
        out = []
        for a, b in self._bins(width):
            if any(t in painted for t in range(a, b)):
                out.append((PAINTED, None))
                continue
            chunk = self.values[a:b]
            chunk = chunk[np.isfinite(chunk)]
            if chunk.size == 0:
                out.append((NOT_PREDICTED, None))
                continue
            c = float(np.clip(chunk.min(), 0.0, 1.0))
            out.append((LEVELS[min(int(c * len(LEVELS)), len(LEVELS) - 1)], c))
        return out

    def bar(self, width: int = BAR_WIDTH) -> str:
        return "".join(ch for ch, _ in self.cells(width))

    def html(self, width: int = BAR_WIDTH) -> str:
        """The bar coloured from red (unsure) to green (sure), with its legend, for a QLabel."""
        spans = []
        for ch, c in self.cells(width):
            colour = "#808080" if c is None else _colour(c)
            spans.append(f'<span style="color:{colour}">{ch}</span>')
        return (
            f"Confidence by {self.orientation} slice {self.lo}..{self.hi}: "
            f'<span style="font-family:monospace">{"".join(spans)}</span><br>'
            f"{self.summary()}"
        )

    def unsure(self, threshold: float = UNSURE) -> list[int]:
        """Predicted, unpainted slices whose confidence is below ``threshold``."""
        return [
            t
            for t in range(self.lo, self.hi + 1)
            if np.isfinite(self.values[t]) and self.values[t] < threshold and t not in self.painted
        ]

    def summary(self) -> str:
        finite = np.isfinite(self.values)
        if not finite.any():
            return "No confidence reported for this propagation."
        low = self.unsure()
        if not low:
            return f"Every predicted slice has confidence {UNSURE:.1f} or more ({PAINTED} painted)."
        return (
            f"Review {self.orientation} slices {_ranges(low)}: confidence under {UNSURE:.1f} "
            f"({PAINTED} painted)."
        )


def _colour(c: float) -> str:
    """Red at confidence 0.3 or less, yellow at 0.6, green at 0.9 or more."""
    x = float(np.clip((c - 0.3) / 0.6, 0.0, 1.0))
    red = int(round(214 if x < 0.5 else 214 - (214 - 44) * (x - 0.5) * 2))
    green = int(round(39 + (160 - 39) * min(1.0, x * 2)))
    return f"#{red:02x}{green:02x}28"


def _ranges(slices: Sequence[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``"3-5, 9"``."""
    parts, start = [], None
    for i, t in enumerate(slices):
        if start is None:
            start = t
        if i + 1 == len(slices) or slices[i + 1] != t + 1:
            parts.append(str(start) if start == t else f"{start}-{t}")
            start = None
    return ", ".join(parts)


def _perSlice(result: Any, name: str, n: int) -> np.ndarray:
    values = getattr(result, name, None)
    if values is None or np.shape(values) != (n,):
        return np.full(n, np.nan)
    return np.asarray(values, dtype=float)


def sliceConfidence(plan: Any, results: Sequence[Any]) -> SliceConfidence:
    """The engine's per-slice confidence of every group, on the full volume's slices."""
    layout = plan.layout
    total = plan.originals[plan.segmentIds[0]].shape[layout.axis]
    n = layout.hi - layout.lo + 1
    values = np.full(total, np.nan)
    with np.errstate(invalid="ignore"):
        for result in results:
            window = values[layout.lo : layout.hi + 1]
            values[layout.lo : layout.hi + 1] = np.fmin(window, _perSlice(result, "confidence", n))
    painted = sorted({t for sid in plan.names for t in layout.annotated[sid]})
    return SliceConfidence(
        layout.axis, layout.orientation, values, tuple(painted), layout.lo, layout.hi
    )


def _pointOn(plan: Any, labels: np.ndarray, values: Sequence[int], t: int) -> tuple:
    """RAS of the centre of the group's segments on window slice ``t`` (the slice's centre
    when they are absent there)."""
    axis = plan.layout.axis
    plane = np.isin(np.take(labels, t, axis=axis), list(values))
    shape = [s for a, s in enumerate(labels.shape) if a != axis]
    rows, cols = np.nonzero(plane)
    centre = [rows.mean(), cols.mean()] if rows.size else [(s - 1) / 2 for s in shape]
    kji = centre[:axis] + [t] + centre[axis:]
    ijk = np.array([kji[2], kji[1], kji[0], 1.0])
    ras = plan.geometry.ijk_to_ras() @ ijk
    return tuple(float(x) for x in ras[:3])


def nextSlice(plan: Any, results: Sequence[Any], alternatives: int = 2) -> NextSlice | None:
    """The best unpainted slice over all groups (None: nothing to suggest)."""
    layout = plan.layout
    n = layout.hi - layout.lo + 1
    ranked = []
    for group, result in zip(plan.groups, results, strict=True):
        labels = getattr(result, "labels", None)
        if labels is None:
            continue
        labels = np.where(np.isin(labels, group.values), labels, 0)
        for s in rank_slices(
            labels,
            layout.axis,
            group.slices,
            _perSlice(result, "confidence", n),
            _perSlice(result, "disagreement", n),
        ):
            ranked.append((s.gain, s, group, labels))
    if not ranked:
        return None
    ranked.sort(key=lambda r: (-r[0], -r[1].distance, r[1].slice))
    _, best, group, labels = ranked[0]
    others = []
    for _, s, _, _ in ranked[1:]:
        if s.slice != best.slice and s.slice + layout.lo not in others:
            others.append(s.slice + layout.lo)
        if len(others) == alternatives:
            break
    return NextSlice(
        axis=layout.axis,
        orientation=layout.orientation,
        index=best.slice + layout.lo,
        score=best.score,
        ras=_pointOn(plan, labels, group.values, best.slice),
        alternatives=tuple(others),
    )
