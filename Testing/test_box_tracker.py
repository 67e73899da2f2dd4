"""LiteMedSAM's box tracker: which box it prompts with, from the learned head and the painting.

No network: a view of a 64 x 64 slice whose coarse-head grid is the slice itself, and a head
output drawn by hand.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from oflsam2.backbones.litemedsam import BoxTracker
from oflsam2.roi import mask_box
from oflsam2.settings import Settings

SIZE = 64  # slice side = coarse grid side = model input side here


class View:
    value = 1
    n_slices = 10

    def __init__(self, annotated, interpolated):
        self.annotated = annotated
        self._interp = interpolated

    def target(self, mask2d, size):
        return torch.from_numpy(mask2d.astype(np.float32))[None]

    def box(self, mask2d):
        box = mask_box(mask2d)
        return None if box is None else torch.tensor(box, dtype=torch.float32)

    def interpolated(self, t):
        return self._interp


def square(r0, c0, side):
    m = np.zeros((SIZE, SIZE), bool)
    m[r0 : r0 + side, c0 : c0 + side] = True
    return m


def head(mask):
    return torch.where(torch.from_numpy(mask), 5.0, -5.0)[None, None]


@pytest.fixture
def tracker_for():
    backbone = types.SimpleNamespace(input_size=SIZE, default_prior="interp")

    def make(interpolated, **changes):
        view = View([0, 9], interpolated)
        return BoxTracker(backbone, Settings(**changes), view)

    return make


def test_beyond_the_range_the_box_is_the_heads_region_continuing_the_previous_mask(tracker_for):
    tracker = tracker_for(square(0, 0, 1))
    previous = square(20, 20, 10)
    region = square(22, 22, 10)  # the structure moved by 2 cells
    elsewhere = square(50, 2, 8)  # something that looks like it, not touching
    box, cover = tracker._continued(previous, head(region | elsewhere))
    assert box.tolist() == [22.0, 22.0, 32.0, 32.0]
    assert cover == pytest.approx(0.97)  # growth is 4-connected: the far corner grows slower


def test_beyond_the_range_the_walk_ends_where_little_continues(tracker_for):
    tracker = tracker_for(square(0, 0, 1))
    previous = square(20, 20, 10)
    box, cover = tracker._continued(previous, head(square(20, 20, 5)))  # 25 of 100 cells
    assert box is None and cover == pytest.approx(0.25)
    box, _ = tracker._continued(previous, head(square(20, 20, 6)))  # 36 of 100: continues
    assert box is not None


def test_no_interpolated_shape_follows_the_head_from_the_previous_slice(tracker_for):
    """Two painted tips that do not overlap leave no interpolated shape between them: the box
    grows with the head's region instead of staying the previous slice's box."""
    tracker = tracker_for(np.zeros((SIZE, SIZE), bool))
    previous = square(30, 30, 4)
    grown = square(28, 28, 12)
    box = tracker._inside_box(3, previous, head(grown))
    assert box.tolist() == [28.0, 28.0, 36.0, 36.0]  # 2 cells (evidence_grow) a slice
    interp_only = tracker_for(np.zeros((SIZE, SIZE), bool), inside="interp")
    assert interp_only._inside_box(3, previous, head(grown)).tolist() == [30.0, 30.0, 34.0, 34.0]


def test_between_painted_slices_the_interpolated_box_grows_to_the_heads_region(tracker_for):
    shape = square(30, 30, 6)
    tracker = tracker_for(shape)
    region = square(26, 26, 16)  # larger than the interpolation, within 2 cells x 3 slices
    assert tracker._inside_box(3, None, head(region)).tolist() == [26.0, 26.0, 42.0, 42.0]
    assert tracker_for(shape, inside="interp")._inside_box(3, None, head(region)).tolist() == [
        30.0,
        30.0,
        36.0,
        36.0,
    ]
