"""Pictures in the radiological convention (as Slicer shows slices), read from the direction
matrix: the sample CT's right lung is drawn on the picture's left, its spine at the bottom."""

from __future__ import annotations

import types

import numpy as np
import pytest
from conftest import RIGHT_LUNG
from PIL import Image

from oflsam2.pictures import slice_view
from oflsam2.volume import Geometry

LEFT_LUNG = 6
THORACIC_SPINE = 3


def centre(mask: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(mask)
    return float(rows.mean()), float(cols.mean())


def test_sample_ct_right_lung_is_on_the_pictures_left(sample_ct, sample_labels):
    labels = sample_labels.array
    view = slice_view(sample_ct.geometry, 0)
    assert view.orientation == "axial" and view.edges == ("R", "L", "A", "P")
    k = 20  # an axial slice through both lungs and the thoracic spine
    pic = view.picture(labels, k)
    height, width = pic.shape
    right_row, right_col = centre(pic == RIGHT_LUNG)
    left_row, left_col = centre(pic == LEFT_LUNG)
    spine_row, _ = centre(pic == THORACIC_SPINE)
    assert right_col < width / 2 < left_col  # patient right on the picture's left
    assert spine_row > height / 2  # the spine is posterior: anterior is up
    # the image and its labels are turned the same way
    np.testing.assert_array_equal(view.picture(sample_ct.array, k), sample_ct.array[k][::-1, ::-1])
    # in array order (what the demo drew before) the right lung is on the right
    assert centre(labels[k] == RIGHT_LUNG)[1] > width / 2


def grid(direction, spacing=(1.0, 2.0, 3.0), size=(4, 5, 6)) -> Geometry:
    return Geometry(size, spacing, (0.0, 0.0, 0.0), tuple(float(d) for d in np.ravel(direction)))


def marked(geometry: Geometry, ras: np.ndarray) -> np.ndarray:
    """A volume holding, at each voxel, the dot product of its RAS position with ``ras``."""
    k, j, i = np.indices(geometry.shape)
    ijk = np.stack([i, j, k, np.ones_like(i)]).reshape(4, -1)
    pos = (geometry.ijk_to_ras() @ ijk)[:3].reshape(3, *geometry.shape)
    return np.tensordot(np.asarray(ras, float), pos, axes=1)


# Direction matrices (LPS, as ITK stores them): identity (i -> L, j -> P, k -> S), the sample's
# (i -> R, j -> A), and a permuted one whose i runs head to foot and k left to right.
DIRECTIONS = {
    "identity": np.eye(3),
    "flipped": np.diag([-1.0, -1.0, 1.0]),
    "permuted": np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]),
}
# Screen directions of Slicer's views (RAS): picture right, picture down.
SCREEN = {
    "axial": ((-1, 0, 0), (0, -1, 0)),
    "coronal": ((-1, 0, 0), (0, 0, -1)),
    "sagittal": ((0, -1, 0), (0, 0, -1)),
}


@pytest.mark.parametrize("name", DIRECTIONS)
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_every_axis_of_every_grid_is_drawn_as_slicer_shows_it(name, axis):
    g = grid(DIRECTIONS[name])
    view = slice_view(g, axis)
    right, down = SCREEN[view.orientation]
    across = view.picture(marked(g, right), 0)  # grows to the picture's right
    below = view.picture(marked(g, down), 0)  # grows down the picture
    assert np.all(np.diff(across, axis=1) > 0) and np.all(np.diff(across, axis=0) == 0)
    assert np.all(np.diff(below, axis=0) > 0) and np.all(np.diff(below, axis=1) == 0)
    # the pixel aspect ratio: physical height over width of one pixel
    step_down = np.diff(below, axis=0)[0, 0]
    step_across = np.diff(across, axis=1)[0, 0]
    assert view.aspect == pytest.approx(step_down / step_across)


def test_orientation_names_follow_the_slice_normal():
    g = grid(DIRECTIONS["permuted"])  # k runs left to right: its slices are sagittal
    assert [slice_view(g, a).orientation for a in range(3)] == ["sagittal", "coronal", "axial"]
    with pytest.raises(ValueError):
        slice_view(g, 3)
    with pytest.raises(ValueError):
        slice_view(g, 0)(np.zeros((2, 2, 2)))


def test_demo_overview_draws_in_the_radiological_convention(tmp_path, sample_ct, sample_labels):
    from oflsam2.cli_demo import draw_overview

    truth = sample_labels.array == RIGHT_LUNG
    sparse = np.where(truth, RIGHT_LUNG, 0).astype(np.uint8)
    seg = types.SimpleNamespace(window=(-1000.0, 400.0), backbone=types.SimpleNamespace(name="x"))
    path = tmp_path / "overview.png"
    draw_overview(path, sample_ct, sparse, sparse, truth, RIGHT_LUNG, [20], 1.0, None, seg)
    with Image.open(path) as im:
        assert im.size == (1200, 660)
