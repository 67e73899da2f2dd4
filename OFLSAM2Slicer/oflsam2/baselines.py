"""The methods OFL-SAM2 is compared with, for the demo and the accuracy benchmark.

Pure functions on label arrays in (k, j, i) order with a slice ``axis`` (array axis):

- :func:`fill_between_slices`: Slicer's "Fill between slices" (ITK's morphological contour
  interpolation with Slicer's settings), what a Slicer user does today without AI;
- :func:`nearest_slice`: every slice copies the nearest painted slice, a floor;
- :func:`litemedsam_box`: what a medical-SAM user does today, box prompts walked slice to
  slice with LiteMedSAM;
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
    arrays = [np.ascontiguousarray(_as_uint8(a)) for a in sparse_maps]
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
    outermost annotated slices; ``between_only`` leaves those empty (the variant facts.md's
    reference numbers were measured with). ``annotated_slices`` defaults to the slices
    holding labels; a named slice may be empty ("structure absent here").
    """
    axis = _check_axis(axis)
    sparse = _as_uint8(sparse)
    annotated = _annotated(sparse, axis, annotated_slices)
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
    other = tuple(a for a in range(3) if a != axis)
    holding = np.flatnonzero(np.any(np.asarray(mask, bool), axis=other))
    if holding.size == 0:
        raise InputError("the structure is empty: nothing to choose slices from")
    lo, hi = int(holding[0]), int(holding[-1])
    chosen = set()
    for i in range(k):
        p = int(np.floor(lo + (i + 0.5) / k * (hi - lo + 1)))
        chosen.add(int(holding[np.argmin(np.abs(holding - p))]))
    return sorted(chosen)


# ---------------------------------------------------------------- LiteMedSAM box walk


def litemedsam_box(
    volume: np.ndarray,
    sparse: np.ndarray,
    axis: int,
    annotated_slices: Sequence[int] | None,
    backbone,
    window: tuple[float, float] | None = None,
    enlarge: float = 0.05,
    cache: dict | None = None,
) -> np.ndarray:
    """Box-prompt propagation with LiteMedSAM, as a medical-SAM user would do by hand.

    From each annotated slice, walk outward both ways; each slice is prompted with the box
    of the previous slice's mask, grown by ``enlarge`` of its size (half on each side; 5%
    scored best of 0, 5, 10 and 20% on the slicerio CT); a walk stops at an empty
    mask, at the volume's end, or where the next annotated slice's walk is nearer (ties:
    the lower slice's walk). Done per segment label; where labels overlap the lower label
    wins; annotated slices are copied from ``sparse`` unchanged.

    ``volume``: the image in (k, j, i) order, raw with ``window`` given, else already in
    [0, 1]. ``backbone``: a :class:`LiteMedSAMBackbone` (prepare / encode / decode).
    ``cache``: optional dict of slice embeddings, reused across calls on the same volume
    and window (encoding dominates the cost).
    """
    import torch
    import torch.nn.functional as F

    from .backbones.litemedsam import resized_shape
    from .volume import apply_window

    axis = _check_axis(axis)
    sparse = _as_uint8(sparse)
    if volume.shape != sparse.shape:
        raise InputError(f"image {volume.shape} and labels {sparse.shape} differ in shape")
    annotated = _annotated(sparse, axis, annotated_slices)
    image = np.moveaxis(volume, axis, 0)
    labels = np.moveaxis(sparse, axis, 0)
    n, height, width = labels.shape
    size = backbone.input_size
    scale = size / max(height, width)
    rh, rw = resized_shape(height, width, size)
    cache = {} if cache is None else cache
    key_window = None if window is None else (float(window[0]), float(window[1]))

    def embedding(t: int) -> torch.Tensor:
        key = (axis, t, key_window)
        if key not in cache:
            slice01 = image[t] if window is None else apply_window(image[t], window)
            cache[key] = backbone.encode(
                backbone.prepare(np.asarray(slice01, np.float32)[None])
            ).embed
        return cache[key]

    def predict(t: int, prev: np.ndarray) -> np.ndarray:
        ys, xs = np.nonzero(prev)
        x0, x1 = xs.min() * scale, (xs.max() + 1) * scale
        y0, y1 = ys.min() * scale, (ys.max() + 1) * scale
        gx, gy = enlarge * (x1 - x0) / 2, enlarge * (y1 - y0) / 2
        box = [
            max(0.0, x0 - gx),
            max(0.0, y0 - gy),
            min(float(rw), x1 + gx),
            min(float(rh), y1 + gy),
        ]
        with torch.no_grad():
            out = backbone.decode(embedding(t), [], boxes=torch.tensor([box]))
            logits = out.logits[
                :, :, : rh * out.logits.shape[-2] // size, : rw * out.logits.shape[-1] // size
            ]
            logits = F.interpolate(
                logits.float(), size=(height, width), mode="bilinear", align_corners=False
            )
        return (logits[0, 0] > 0).cpu().numpy()

    out = np.zeros_like(labels)
    for value in sorted(int(v) for v in np.unique(labels[annotated]) if v):
        pred = np.zeros((n, height, width), bool)
        for i, a in enumerate(annotated):
            seed = labels[a] == value
            if not seed.any():
                continue  # "structure absent here": nothing walks from this slice
            below = range(a - 1, (annotated[i - 1] + a) // 2, -1) if i > 0 else range(a - 1, -1, -1)
            above = (
                range(a + 1, (a + annotated[i + 1]) // 2 + 1)
                if i + 1 < len(annotated)
                else range(a + 1, n)
            )
            for walk in (below, above):
                prev = seed
                for t in walk:
                    mask = predict(t, prev)
                    if not mask.any():
                        break
                    pred[t] = mask
                    prev = mask
        out[pred & (out == 0)] = value
    out[annotated] = labels[annotated]
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))


# ---------------------------------------------------------------- helpers


def _check_axis(axis: int) -> int:
    if int(axis) not in (0, 1, 2):
        raise InputError(f"slice axis must be 0, 1 or 2, not {axis}")
    return int(axis)


def _as_uint8(labels: np.ndarray) -> np.ndarray:
    a = np.asarray(labels)
    if a.dtype == bool:
        return a.astype(np.uint8)
    if a.size and (a.min() < 0 or a.max() > 255):
        raise InputError("label values must lie in 0..255")
    return a.astype(np.uint8, copy=False)


def _annotated(sparse: np.ndarray, axis: int, slices: Sequence[int] | None) -> list[int]:
    n = sparse.shape[axis]
    if slices is None:
        other = tuple(a for a in range(3) if a != axis)
        chosen = [int(s) for s in np.flatnonzero(np.any(sparse != 0, axis=other))]
    else:
        chosen = sorted({int(s) for s in slices})
        bad = [s for s in chosen if not 0 <= s < n]
        if bad:
            raise InputError(f"slice(s) {bad} outside 0..{n - 1} along axis {axis}")
    if not chosen:
        raise InputError("no annotated slice: paint the structure on at least one slice")
    return chosen
