"""The methods OFL-SAM2 is compared with, for the demo and the accuracy benchmark.

(The benchmark's LiteMedSAM box walk lives in ``bench/baselines_litemedsam.py``.)

Pure functions on label arrays in (k, j, i) order with a slice ``axis`` (array axis):

- :func:`fill_between_slices`: Slicer's "Fill between slices" (ITK's morphological contour
  interpolation with Slicer's settings), what a Slicer user does today without AI;
- :func:`nearest_slice`: every slice copies the nearest painted slice, a floor;
- :func:`choose_slices`: which K slices a benchmark "paints", deterministically.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import InputError
from .volume import as_labels, find_annotated, slices_with_labels

_WORKER = Path(__file__).with_name("_mci_worker.py")
_MISSING_EXIT = 3  # _mci_worker.MISSING_EXIT (not imported: the worker stays standalone)
_WORKER_TIMEOUT_S = 1800


class InterpolatorUnavailable(InputError):
    """ITK's contour interpolator (Slicer's "Fill between slices") is not installed."""


# ---------------------------------------------------------------- fill between slices


def fill_between_slices(
    sparse: np.ndarray, axis: int, spacing_kji: Sequence[float] | None = None
) -> np.ndarray:
    """Slicer's "Fill between slices" on a label map painted on slices along ``axis``.

    ITK's MorphologicalContourInterpolator with Slicer's settings (all labels, heuristic
    alignment on, distance transform off), interpolating along ``axis``. Nothing is
    extrapolated beyond the outermost painted slices. Runs in a child process (about
    10 s to load ITK): the ``itk`` interpolator and SimpleITK crash when loaded together.
    """
    return fill_between_slices_many([sparse], axis, spacing_kji)[0]


def fill_between_slices_many(
    sparse_maps: Sequence[np.ndarray],
    axis: int | Sequence[int],
    spacing_kji: Sequence[float] | None = None,
) -> list[np.ndarray]:
    """:func:`fill_between_slices` on several label maps in one child process (one ITK load).

    ``axis`` is one axis for all maps or one per map.
    """
    arrays = [np.ascontiguousarray(as_labels(np.asarray(a), "label map")) for a in sparse_maps]
    axes = [axis] * len(arrays) if isinstance(axis, (int, np.integer)) else list(axis)
    if len(axes) != len(arrays):
        raise InputError(f"{len(arrays)} label maps but {len(axes)} axes")
    axes = [_check_axis(a) for a in axes]
    for a in arrays:
        if a.ndim != 3:
            raise InputError(f"fill between slices needs 3D label maps, got shape {a.shape}")
    if not arrays:
        return []
    spacing = [1.0, 1.0, 1.0] if spacing_kji is None else [float(s) for s in spacing_kji]
    job = {
        "count": len(arrays),
        "axes": [2 - a for a in axes],  # ITK indexes axes (i, j, k): array axis a is ITK axis 2 - a
        "spacing": spacing[::-1],
    }
    with tempfile.TemporaryDirectory(prefix="oflsam2-mci-") as tmp:
        folder = Path(tmp)
        (folder / "job.json").write_text(json.dumps(job))
        for n, a in enumerate(arrays):
            np.save(folder / f"in_{n}.npy", a, allow_pickle=False)
        # Run the worker by path from the temporary folder: it imports only numpy and itk,
        # never oflsam2 (whose package may pull in SimpleITK).
        code = f"import runpy, sys; sys.argv = [{str(_WORKER)!r}, {tmp!r}]; runpy.run_path(sys.argv[0], run_name='__main__')"
        try:
            proc = subprocess.run(
                [sys.executable, "-c", code],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=_WORKER_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"fill between slices took over {_WORKER_TIMEOUT_S} s and was stopped"
            ) from None
        detail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1][:200]
        if proc.returncode == _MISSING_EXIT:
            raise InterpolatorUnavailable(
                "fill between slices needs ITK's contour interpolator: pip install itk-morphologicalcontourinterpolation"
            )
        if proc.returncode != 0:
            raise RuntimeError(f"fill between slices failed in its ITK process: {detail}")
        return [np.load(folder / f"out_{n}.npy", allow_pickle=False) for n in range(len(arrays))]


# ---------------------------------------------------------------- nearest slice


def nearest_slice(
    sparse: np.ndarray,
    axis: int,
    annotated_slices: Sequence[int] | None = None,
    between_only: bool = False,
) -> np.ndarray:
    """Every slice copies the nearest annotated slice (ties: the lower one).

    The floor any propagation method must beat. By default everywhere, also beyond the
    outermost annotated slices; ``between_only`` leaves those empty (what Fill between
    slices does, so the two compare on the same slices). ``annotated_slices`` defaults to the
    slices holding labels; a named slice may be empty ("structure absent here"), but every
    slice holding labels must be named.
    """
    axis = _check_axis(axis)
    sparse = as_labels(np.asarray(sparse), "label map")
    annotated = find_annotated(sparse, axis, annotated_slices).slices
    moved = np.moveaxis(sparse, axis, 0)
    out = moved[_nearest_index(moved.shape[0], annotated)]
    if between_only:
        out[: annotated[0]] = 0
        out[annotated[-1] + 1 :] = 0
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))


def _nearest_index(n: int, annotated: list[int]) -> np.ndarray:
    """For each of n slices, the nearest annotated slice; ties go to the lower one."""
    a = np.asarray(annotated)
    dist = np.abs(np.arange(n)[:, None] - a[None, :])
    return a[np.argmin(dist, axis=1)]  # argmin takes the first minimum; ``a`` is sorted


# ---------------------------------------------------------------- slice choice


def choose_slices(mask: np.ndarray, axis: int, k: int) -> list[int]:
    """K slices to paint, spread evenly over the structure's extent along ``axis``.

    With [lo, hi] the extent, slice i of K sits at floor(lo + (i + 0.5) / K * (hi - lo + 1));
    a position where the structure is absent moves to the nearest slice that holds it
    (ties: lower). Sorted, without duplicates (so fewer than K for a short structure).
    """
    axis = _check_axis(axis)
    if k < 1:
        raise InputError(f"choose at least one slice, not {k}")
    holding = slices_with_labels(np.asarray(mask), axis)
    if holding.size == 0:
        raise InputError("the structure is empty: nothing to choose slices from")
    lo, hi = int(holding[0]), int(holding[-1])
    chosen = set()
    for i in range(k):
        p = int(np.floor(lo + (i + 0.5) / k * (hi - lo + 1)))
        chosen.add(int(holding[np.argmin(np.abs(holding - p))]))
    return sorted(chosen)


# ---------------------------------------------------------------- helpers


def _check_axis(axis: int) -> int:
    if int(axis) not in (0, 1, 2):
        raise InputError(f"slice axis must be 0, 1 or 2, not {axis}")
    return int(axis)
