"""Where a structure ends comes from the image, not from where the slices were painted.

The right lung of the sample CT (axial slices 7..33) painted two ways the old rule got wrong:
three neighbouring slices in the middle (the walk used to stop half a painted gap beyond them,
Dice 0.52) and its first, middle and last slice (the walk used to add slices beyond the ends).
LiteMedSAM's real weights, the default settings.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import AXIS, RIGHT_LUNG

from oflsam2.metrics import dice
from oflsam2.segmenter import OFLSegmenter
from oflsam2.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.engine]

# bench/accuracy.py, seed 0, 2026-12-02: cluster 0.903, ends 0.783 with no voxel beyond the ends.
CLUSTER_FLOOR = 0.85
ENDS_FLOOR = 0.72


@pytest.fixture(scope="module")
def lung(sample_ct, sample_labels):
    truth = sample_labels.array == RIGHT_LUNG
    seg = OFLSegmenter(Settings(device="cpu", seed=0))
    seg.set_volume(sample_ct.array, sample_ct.geometry, "CT")
    return seg, truth


def _run(seg: OFLSegmenter, truth: np.ndarray, slices: list[int]) -> np.ndarray:
    seg.reset(Settings(device="cpu", seed=0))  # fresh learners, the encoded slices kept
    return _fit_propagate(seg, truth, slices).labels == RIGHT_LUNG


def test_three_neighbouring_slices_reach_both_ends_of_the_lung(lung):
    seg, truth = lung
    slices = [18, 20, 22]
    pred = _run(seg, truth, slices)
    unpainted = [t for t in range(truth.shape[0]) if t not in slices]
    assert dice(pred[unpainted], truth[unpainted]) > CLUSTER_FLOOR
    predicted = np.flatnonzero(pred.any(axis=(1, 2)))
    # The lung spans 7..33; the old rule (half a painted gap) stopped at 16 and 24.
    assert predicted.min() <= 12 and predicted.max() >= 27


def test_painted_first_and_last_slices_add_nothing_beyond_them(lung):
    seg, truth = lung
    slices = [7, 20, 33]
    pred = _run(seg, truth, slices)
    assert not pred[:7].any() and not pred[34:].any()
    unpainted = [t for t in range(truth.shape[0]) if t not in slices]
    assert dice(pred[unpainted], truth[unpainted]) > ENDS_FLOOR


def test_a_correction_re_runs_only_its_interval(lung):
    """Painting slice 16 between 11 and 20 re-decodes 12..19 only; those slices are what a full
    run with the same (warm-started) learner gives, every other slice is kept as it was."""
    seg, truth = lung
    seg.reset(Settings(device="cpu", seed=0, fit_steps=10))
    first = _fit_propagate(seg, truth, [11, 20, 29])
    local = _fit_propagate(seg, truth, [11, 16, 20, 29])
    assert local.recomputed[RIGHT_LUNG] == [12, 13, 14, 15, 17, 18, 19]
    seg.retune(seg.settings.replace(local=False))
    full = seg.propagate()
    changed = list(range(12, 20))
    np.testing.assert_array_equal(local.labels[changed], full.labels[changed])
    kept = [t for t in range(truth.shape[0]) if t not in changed]
    np.testing.assert_array_equal(local.labels[kept], first.labels[kept])
    assert len(full.recomputed[RIGHT_LUNG]) > 2 * len(local.recomputed[RIGHT_LUNG])


def _fit_propagate(seg: OFLSegmenter, truth: np.ndarray, slices: list[int]):
    sparse = np.zeros(truth.shape, np.uint8)
    sparse[slices] = truth[slices] * np.uint8(RIGHT_LUNG)
    seg.fit(sparse, slices=slices, axis=AXIS)
    return seg.propagate()
