"""Overlap and distance metrics on label arrays in (k, j, i) order."""

from __future__ import annotations

import math

import numpy as np


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks; both empty counts as perfect agreement (1.0)."""
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    eroded = ndimage.binary_erosion(
        mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0
    )
    return mask & ~eroded


def hd95(a: np.ndarray, b: np.ndarray, spacing_kji: tuple[float, float, float]) -> float:
    """95th percentile symmetric surface distance in mm.

    ``spacing_kji`` is the voxel size in array order (k, j, i). Both empty: 0.0;
    one empty: ``math.inf``.
    """
    from scipy import ndimage

    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return math.inf
    sa, sb = _surface(a), _surface(b)
    dist_to_b = ndimage.distance_transform_edt(~sb, sampling=spacing_kji)
    dist_to_a = ndimage.distance_transform_edt(~sa, sampling=spacing_kji)
    d = np.concatenate([dist_to_b[sa], dist_to_a[sb]])
    return float(np.percentile(d, 95))
