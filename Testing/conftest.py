"""What the tests share: the sample CT, the slices "painted" on it, and the quality floors.

The sample is the chest CT that ships in the ``slicerio`` wheel (34 x 128 x 128) with its
7-segment segmentation. It is read once per session with :mod:`oflsam2.volume`; its arrays
are read-only, so a test that would change them fails instead of corrupting later tests.

Markers (registered in pyproject.toml): ``slow`` for tests that take more than a few
seconds (the fast suite is ``pytest -m "not slow"``), ``engine`` for tests that run the
OFL-SAM2 engine or a backbone's network.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import slicerio

from oflsam2 import volume as vol
from oflsam2.baselines import choose_slices

CT_PATH = slicerio.get_testdata_file("CTChest4.nrrd")
SEG_PATH = slicerio.get_testdata_file("Segmentation.seg.nrrd")
RIGHT_LUNG = 5  # label value of "right lung" in the sample segmentation
AXIS = 0  # the sample is painted on axial slices (array axis 0)
PAINTED_K = 3  # slices painted per segment, as in the demo and the benchmark

# Quality floors: one per measured case, Dice on the unpainted slices unless said otherwise.
# OFL-SAM2 with LiteMedSAM on the right lung painted on RIGHT_LUNG_SLICES (CLI, demo and
# Slicer glue): bench/accuracy.py measured 0.945 with the default settings; the Slicer
# glue's lean run (10 fit steps, no online learning) gives about 0.91.
RIGHT_LUNG_LITEMEDSAM_FLOOR = 0.88
# The benchmark's LiteMedSAM box walk on axial slices 11..15, painted on 12 and 14.
RIGHT_LUNG_BOX_WALK_FLOOR = 0.85
# LiteMedSAM alone, prompted with the ground-truth box on the middle painted slice (20).
RIGHT_LUNG_TRUE_BOX_FLOOR = 0.90


def painted_slices(mask: np.ndarray, k: int = PAINTED_K, axis: int = AXIS) -> list[int]:
    """The K slices of ``mask`` a test "paints": the benchmark's choice (``choose_slices``)."""
    return choose_slices(mask, axis, k)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


@dataclasses.dataclass(frozen=True)
class PaintedCase:
    """One segment of the sample painted on a few slices, with the truth to score against."""

    value: int  # label value
    axis: int
    slices: tuple[int, ...]  # the painted slices, sorted
    truth: np.ndarray  # bool (k, j, i), read-only: the whole segment
    sparse: np.ndarray  # uint8 (k, j, i), read-only: ``value`` on the painted slices only

    @property
    def unpainted(self) -> list[int]:
        """Every slice along ``axis`` that is not painted (where quality is measured)."""
        return [s for s in range(self.truth.shape[self.axis]) if s not in self.slices]


@pytest.fixture(scope="session")
def sample_ct() -> vol.Volume:
    """The slicerio chest CT (int16, read-only array), read with oflsam2.volume."""
    image = vol.read_image(CT_PATH)
    _read_only(image.array)
    return image


@pytest.fixture(scope="session")
def sample_labels(sample_ct) -> vol.LabelMap:
    """The sample's 7-segment label map on the CT's grid (uint8, read-only array)."""
    labels = vol.read_labels(SEG_PATH, sample_ct.geometry)
    _read_only(labels.array)
    return labels


@pytest.fixture(scope="session")
def right_lung(sample_labels) -> PaintedCase:
    """The right lung painted on the PAINTED_K axial slices of :func:`painted_slices` (11, 20, 29)."""
    truth = _read_only(sample_labels.array == RIGHT_LUNG)
    slices = tuple(painted_slices(truth))
    index = [slice(None)] * 3
    index[AXIS] = list(slices)
    sparse = np.zeros(truth.shape, np.uint8)
    sparse[tuple(index)] = truth[tuple(index)] * np.uint8(RIGHT_LUNG)
    return PaintedCase(RIGHT_LUNG, AXIS, slices, truth, _read_only(sparse))
