"""Comparison methods: Slicer's fill between slices (child process), nearest slice, slice choice,
and the benchmark's LiteMedSAM box walk (bench/baselines_litemedsam.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import RIGHT_LUNG, RIGHT_LUNG_BOX_WALK_FLOOR

from oflsam2 import baselines
from oflsam2.baselines import (
    InterpolatorUnavailable,
    choose_slices,
    fill_between_slices,
    fill_between_slices_many,
    nearest_slice,
)
from oflsam2.errors import InputError
from oflsam2.metrics import dice

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _growing_disc(n: int = 20, side: int = 40) -> np.ndarray:
    z, y, x = np.mgrid[:n, :side, :side]
    radius = 4 + 0.5 * z
    return ((y - side // 2) ** 2 + (x - side // 2) ** 2 <= radius**2).astype(np.uint8)


def _sphere(n: int = 24) -> np.ndarray:
    z, y, x = np.mgrid[:n, :n, :n]
    c = (n - 1) / 2
    return (((z - c) ** 2 + (y - c) ** 2 + (x - c) ** 2) <= (0.4 * n) ** 2).astype(np.uint8)


@pytest.mark.slow
def test_fill_between_slices_interpolates_in_a_child_process():
    cases = [
        (_growing_disc(), 0, [2, 9, 16]),
        (_sphere(), 2, [4, 11, 18]),  # painted on sagittal slices: array axis 2 is ITK axis 0
    ]
    sparse_maps, index = [], []
    for truth, axis, painted in cases:
        idx = [slice(None)] * 3
        idx[axis] = painted
        sparse = np.zeros_like(truth)
        sparse[tuple(idx)] = truth[tuple(idx)] * 3  # any label value
        sparse_maps.append(sparse)
        index.append(idx)
    # one child process (one ITK load, about 10 s) for both cases
    outs = fill_between_slices_many(sparse_maps, [axis for _, axis, _ in cases], (1.0, 1.0, 1.0))
    for (truth, axis, painted), sparse, idx, out in zip(
        cases, sparse_maps, index, outs, strict=True
    ):
        assert out.shape == truth.shape and out.dtype == np.uint8
        assert set(np.unique(out)) <= {0, 3}
        assert np.array_equal(out[tuple(idx)], sparse[tuple(idx)])  # painted slices kept exactly
        idx[axis] = [s for s in range(painted[0], painted[-1] + 1) if s not in painted]
        assert dice(out[tuple(idx)] > 0, truth[tuple(idx)] > 0) > 0.9
        idx[axis] = [s for s in range(truth.shape[axis]) if not painted[0] <= s <= painted[-1]]
        assert not out[tuple(idx)].any()  # no extrapolation
    assert "itk" not in sys.modules


def test_missing_interpolator_is_one_clear_error(tmp_path, monkeypatch):
    fake = tmp_path / "worker.py"
    fake.write_text("import sys\nprint('itk missing', file=sys.stderr)\nsys.exit(3)\n")
    monkeypatch.setattr(baselines, "_WORKER", fake)
    with pytest.raises(
        InterpolatorUnavailable, match="pip install itk-morphologicalcontourinterpolation"
    ):
        fill_between_slices(np.zeros((3, 4, 4), np.uint8), 0)


def test_nearest_slice_copies_the_nearest_annotated_slice():
    sparse = np.zeros((7, 2, 2), np.uint8)
    sparse[1, 0, 0] = 1
    sparse[4, 1, 1] = 2
    out = nearest_slice(sparse, 0, [1, 4])
    # slices 0..2 from slice 1; slice 3 is 2 from 1 and 1 from 4; 5, 6 from 4
    expected = sparse[[1, 1, 1, 4, 4, 4, 4]]
    assert np.array_equal(out, expected)
    # tie at slice 2 (between 0 and 4) goes to the lower; an empty named slice copies emptiness
    sparse = np.zeros((2, 2, 5), np.uint8)
    sparse[:, :, 4] = 1
    out = nearest_slice(sparse, 2, [0, 4])
    assert np.array_equal(out[:, :, :3], np.zeros((2, 2, 3))) and out[:, :, 3:].all()
    assert np.array_equal(nearest_slice(sparse, 2), np.ones_like(sparse))
    # between_only: nothing beyond the outermost annotated slices
    sparse = np.zeros((6, 1, 1), np.uint8)
    sparse[[2, 4]] = 7
    out = nearest_slice(sparse, 0, between_only=True)
    assert out[:, 0, 0].tolist() == [0, 0, 7, 7, 7, 0]


def test_choose_slices_is_deterministic():
    mask = np.zeros((40, 3, 3), bool)
    mask[10:30, 1, 1] = True  # extent 10..29, 20 slices
    assert choose_slices(mask, 0, 2) == [15, 25]
    assert choose_slices(mask, 0, 3) == [13, 20, 26]
    assert choose_slices(mask, 0, 5) == [12, 16, 20, 24, 28]
    assert choose_slices(mask, 0, 1) == [20]
    # a hole: position 20 is empty, nearest holding slices 18 and 22 -> the lower one
    mask[19:22] = False
    mask[22, 1, 1] = True
    assert choose_slices(mask, 0, 1) == [18]
    # a short structure gives fewer slices, without duplicates; other axes work alike
    short = np.zeros((3, 3, 6), bool)
    short[:, :, 2:4] = True
    assert choose_slices(short, 2, 5) == [2, 3]
    with pytest.raises(ValueError):
        choose_slices(np.zeros((3, 3, 3), bool), 0, 2)


def test_nearest_slice_needs_every_labelled_slice_named():
    sparse = np.zeros((6, 1, 1), np.uint8)
    sparse[[1, 4]] = 2
    with pytest.raises(InputError, match=r"labels on slice\(s\) \[4\] .* not in --slices"):
        nearest_slice(sparse, 0, [1])
    with pytest.raises(InputError, match="label map is empty"):
        nearest_slice(np.zeros((3, 2, 2), np.uint8), 0)


@pytest.fixture(scope="module")
def litemedsam_box():
    """bench/baselines_litemedsam.py's box walk (bench/ is not a package)."""
    sys.path.insert(0, str(BENCH))
    try:
        from baselines_litemedsam import litemedsam_box
    finally:
        sys.path.remove(str(BENCH))
    return litemedsam_box


@pytest.mark.slow
@pytest.mark.engine
def test_litemedsam_box_walk_on_the_ct_lung(litemedsam_box, sample_ct, sample_labels):
    from oflsam2.backbones.litemedsam import LiteMedSAMBackbone
    from oflsam2.volume import intensity_window

    lung = sample_labels.array == RIGHT_LUNG
    image, truth = sample_ct.array[11:16], lung[11:16].astype(np.uint8) * RIGHT_LUNG
    sparse = np.zeros_like(truth)
    sparse[[1, 3]] = truth[[1, 3]]
    window = intensity_window(sample_ct.array, None, lung)
    cache: dict = {}
    out = litemedsam_box(
        image, sparse, 0, [1, 3], LiteMedSAMBackbone(device="cpu"), window=window, cache=cache
    )
    assert np.array_equal(out[[1, 3]], sparse[[1, 3]])
    assert set(np.unique(out)) <= {0, RIGHT_LUNG}
    assert dice(out[[0, 2, 4]], truth[[0, 2, 4]]) > RIGHT_LUNG_BOX_WALK_FLOOR
    assert len(cache) == 3  # only the slices walked were encoded
