"""Where to paint next: the unpainted slices ranked by how much painting them should help.

After a propagation the engine knows, per slice along the axis, its own confidence
(``Result.confidence``), the disagreement of the forward and backward walks where both reached
the slice (``Result.disagreement``), and what it predicted (``Result.labels``). The measure here
turns those into one number per unpainted slice: the share of the result's expected error that
painting that slice should remove. It is deliberately a small model, with one assumption each:

1. **Expected error of slice s** (wrong voxels): ``area(s) * u(s)``. ``area`` is the predicted
   size of the structure on ``s`` (errors are made on the boundary and inside the structure,
   so a slice holding a big cross-section can hold many wrong voxels; it is floored at a tenth
   of the painted slices' mean area so that a slice the walk left nearly empty still counts).
   ``u`` is how unsure the result is there, in 0..1: ``1 - confidence``, or the disagreement of
   the two walks where it is larger (two walks from two painted slices that end up with
   different masks are a direct sign that at least one is wrong; a walk can be confidently
   wrong, so the more pessimistic of the two signals is taken).
2. **What painting slice t removes**: its own error, all of it, and part of its neighbours'.
   Between painted slices the error of a propagated slice grows with its distance ``d`` to the
   nearest painted slice (fill-between-slices and tracking both drift with every step), so
   painting ``t`` cuts the error of slice ``s`` by the fraction ``1 - d_new(s) / d_old(s)``
   with ``d_new(s) = min(d_old(s), |s - t|)``. Painting cannot help across a painted slice,
   so only the slices of ``t``'s own unpainted run count.

The score of ``t`` is the sum over its run of ``error(s) * (1 - d_new / d_old)``, over every
segment, divided by the total expected error. With no signal at all (uniform error) it picks
the middle of the largest gap between painted slices, so it is the gap rule of thumb moved
towards the slices where the result is least sure and the structure biggest.
``bench/guided.py`` measures it against that rule and against random slices.

Candidates are the unpainted slices from the first to the last slice where a segment is
painted or predicted: a slice outside every prediction has no estimate of its error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

AREA_FLOOR = 0.1  # of the painted slices' mean area: the least a slice in range is worth


@dataclass(frozen=True)
class Suggestion:
    """One slice to paint: ``slice`` along ``axis``, ``score`` the share (0..1) of the expected
    error that painting it should remove, and the signals behind it."""

    slice: int
    score: float
    confidence: float | None  # the engine's confidence there (None: not predicted)
    disagreement: float | None  # forward/backward walks (None: only one walk reached it)
    distance: int  # slices to the nearest painted slice
    gain: float = 0.0  # expected wrong voxels it removes (to compare separate rankings)

    def as_dict(self) -> dict:
        return {
            "slice": self.slice,
            "score": round(self.score, 4),
            "confidence": None if self.confidence is None else round(self.confidence, 4),
            "disagreement": None if self.disagreement is None else round(self.disagreement, 4),
            "distance": self.distance,
        }


def uncertainty(confidence: np.ndarray, disagreement: np.ndarray | None) -> np.ndarray:
    """Per slice, 0..1: ``1 - confidence``, or the walks' disagreement where that is larger;
    0.5 where neither is known."""
    conf = np.asarray(confidence, dtype=float)
    u = np.where(np.isfinite(conf), 1.0 - np.clip(conf, 0.0, 1.0), 0.5)
    if disagreement is not None:
        d = np.asarray(disagreement, dtype=float)
        u = np.where(np.isfinite(d), np.maximum(u, np.clip(d, 0.0, 1.0)), u)
    return u


def _areas(labels: np.ndarray, axis: int) -> dict[int, np.ndarray]:
    """Segment value -> voxels of that value on each slice along ``axis``."""
    moved = np.moveaxis(np.asarray(labels), axis, 0).reshape(labels.shape[axis], -1)
    values = [int(v) for v in np.unique(moved) if v != 0]
    return {v: np.count_nonzero(moved == v, axis=1) for v in values}


def _runs(candidates: np.ndarray) -> list[np.ndarray]:
    """Maximal runs of consecutive slices in a sorted array."""
    if candidates.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(candidates) > 1) + 1
    return np.split(candidates, breaks)


def _segment_errors(
    area: np.ndarray, painted: np.ndarray, u: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One segment: its candidate slices and their expected error (wrong voxels)."""
    n = area.size
    held = np.flatnonzero(area > 0)
    inside = held if painted.size == 0 else np.union1d(held, painted)
    if inside.size == 0:
        return np.zeros(0, int), np.zeros(0)
    lo, hi = int(inside[0]), int(inside[-1])
    candidates = np.setdiff1d(np.arange(lo, hi + 1), painted)
    reference = area[painted[(painted >= 0) & (painted < n)]]
    reference = reference[reference > 0]
    mean = float(reference.mean()) if reference.size else float(area[held].mean())
    error = np.maximum(area[candidates], AREA_FLOOR * mean) * u[candidates]
    return candidates, error


def _gains(candidates: np.ndarray, error: np.ndarray, painted: np.ndarray) -> np.ndarray:
    """Expected error removed by painting each candidate (assumption 2 of the module)."""
    gains = np.zeros(candidates.size)
    if painted.size:
        d_old = np.min(np.abs(candidates[:, None] - painted[None, :]), axis=1).astype(float)
    else:
        d_old = np.full(candidates.size, float(candidates.size))
    start = 0
    for run in _runs(candidates):
        part = slice(start, start + run.size)
        start += run.size
        d, e = d_old[part], error[part]
        d_new = np.minimum(d[None, :], np.abs(run[:, None] - run[None, :]))  # (t, s)
        gains[part] = ((1.0 - d_new / d[None, :]) * e[None, :]).sum(axis=1)
    return gains


def rank_slices(
    labels: np.ndarray,
    axis: int,
    painted: Sequence[int],
    confidence: np.ndarray,
    disagreement: np.ndarray | None = None,
) -> list[Suggestion]:
    """Every candidate slice (module docstring), best first.

    ``labels`` is the propagated label map (k, j, i), ``painted`` the painted slices along
    ``axis``, ``confidence`` and ``disagreement`` the engine's per-slice arrays (nan where
    unknown). Ties go to the slice farther from any painted slice, then the lower index.
    """
    labels = np.asarray(labels)
    n = labels.shape[axis]
    painted_arr = np.array(sorted({int(p) for p in painted if 0 <= int(p) < n}), dtype=int)
    conf = np.asarray(confidence, dtype=float)
    dis = None if disagreement is None else np.asarray(disagreement, dtype=float)
    u = uncertainty(conf, dis)
    total: dict[int, float] = {}
    expected = 0.0
    for area in _areas(labels, axis).values():
        candidates, error = _segment_errors(area, painted_arr, u)
        expected += float(error.sum())
        for t, g in zip(candidates.tolist(), _gains(candidates, error, painted_arr), strict=True):
            total[t] = total.get(t, 0.0) + float(g)
    out = []
    for t, gain in total.items():
        distance = int(np.min(np.abs(painted_arr - t))) if painted_arr.size else n
        out.append(
            Suggestion(
                slice=t,
                score=gain / expected if expected > 0 else 0.0,
                confidence=float(conf[t]) if np.isfinite(conf[t]) else None,
                disagreement=float(dis[t]) if dis is not None and np.isfinite(dis[t]) else None,
                distance=distance,
                gain=gain,
            )
        )
    out.sort(key=lambda s: (-s.score, -s.distance, s.slice))
    return out


def suggest(result, top: int = 3) -> list[Suggestion]:
    """The ``top`` slices to paint next after an engine :class:`~oflsam2.segmenter.Result`."""
    return rank_slices(
        result.labels,
        result.axis,
        result.annotated,
        result.confidence,
        getattr(result, "disagreement", None),
    )[:top]
