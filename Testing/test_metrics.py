"""Dice and HD95 with exact expected values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from oflsam2.metrics import dice, hd95


def test_dice_values():
    a = np.zeros((3, 4, 5), bool)
    b = np.zeros((3, 4, 5), bool)
    assert dice(a, b) == 1.0  # both empty: perfect agreement
    a[1, 1, 1:4] = True  # 3 voxels
    assert dice(a, b) == 0.0  # one empty
    assert dice(b, a) == 0.0
    b[1, 1, 2:5] = True  # 3 voxels, 2 shared
    assert dice(a, b) == pytest.approx(2 * 2 / 6, abs=1e-15)
    assert dice(a, a) == 1.0
    labels = np.where(a, 7, 0)  # any non-zero label counts as foreground
    assert dice(labels, a) == 1.0


def test_hd95_empty_cases():
    empty = np.zeros((4, 4, 4), bool)
    full = np.zeros((4, 4, 4), bool)
    full[1:3, 1:3, 1:3] = True
    assert hd95(empty, empty, (1.0, 1.0, 1.0)) == 0.0
    assert hd95(full, empty, (1.0, 1.0, 1.0)) == math.inf
    assert hd95(empty, full, (1.0, 1.0, 1.0)) == math.inf
    assert hd95(full, full, (3.0, 2.0, 0.5)) == 0.0


def test_hd95_plates_shifted_along_k_uses_k_spacing():
    """Two one-voxel-thick plates two slices apart: every surface distance is 2 * 3 mm."""
    spacing = (3.0, 1.0, 0.5)  # (k, j, i)
    a = np.zeros((8, 6, 6), bool)
    b = np.zeros((8, 6, 6), bool)
    a[2, 1:5, 1:5] = True
    b[4, 1:5, 1:5] = True
    assert hd95(a, b, spacing) == 6.0
    assert hd95(b, a, spacing) == 6.0


def test_hd95_plates_shifted_along_i_uses_i_spacing():
    spacing = (3.0, 1.0, 0.5)
    a = np.zeros((6, 6, 12), bool)
    b = np.zeros((6, 6, 12), bool)
    a[1:5, 1:5, 3] = True
    b[1:5, 1:5, 8] = True
    assert hd95(a, b, spacing) == 2.5  # 5 voxels * 0.5 mm


def _surface_points(mask: np.ndarray, spacing) -> np.ndarray:
    """Voxels of ``mask`` with a 6-neighbour outside it (the array border counts as outside)."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1, 1:-1]
    all_in = np.ones_like(mask)
    for axis in range(3):
        for step in (-1, 1):
            all_in &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    surface = inner & ~all_in
    return np.argwhere(surface) * np.asarray(spacing)


def test_hd95_matches_brute_force_on_shifted_boxes():
    spacing = (2.5, 0.8, 1.3)
    a = np.zeros((10, 12, 12), bool)
    b = np.zeros((10, 12, 12), bool)
    a[2:7, 3:9, 2:8] = True
    b[3:8, 4:10, 2:8] = True  # shifted by one voxel along k and j
    pa, pb = _surface_points(a, spacing), _surface_points(b, spacing)
    d = cdist(pa, pb)
    expected = float(np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95))
    assert expected > 0
    assert hd95(a, b, spacing) == pytest.approx(expected, abs=1e-9)
