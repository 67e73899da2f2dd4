"""The panel's guidance on a real MRML scene (slicer-core): the slice to paint next, the jump
of the slice views there, and the confidence per slice, with a stand-in engine."""

# ruff: noqa: F811 (the tests take the fixtures ``mrml`` and ``ct`` imported below as arguments)

from __future__ import annotations

import types

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from test_slicer_logic import (  # noqa: E402
    RIGHT_LUNG,
    FakeSegmenter,
    ct,  # noqa: F401 (a fixture: the scene's CT)
    fake_panel,
    mrml,  # noqa: F401 (a fixture: the MRML scene)
    painted_segmentation,
)

from oflsam2_slicer import (  # noqa: E402
    NextSlice,
    OFLSAM2Logic,
    SliceConfidence,
    applyPanelState,
    panelState,
)


class ConfidentFake(FakeSegmenter):
    """The stand-in engine, reporting a confidence per slice (``low`` in window slices)."""

    low: dict[int, float] = {}

    def propagate(self, progress=None, cancel=None):
        result = super().propagate(progress, cancel)
        n = self._array.shape[self.ann.axis]
        conf = np.full(n, 0.9)
        conf[list(self.ann.slices)] = np.nan
        dis = np.full(n, np.nan)
        for t, c in self.low.items():
            conf[t], dis[t] = c, 1 - c
        result.confidence, result.disagreement = conf, dis
        return result


LOGICS: list[OFLSAM2Logic] = []


@pytest.fixture(autouse=True)
def _cleanup_logics():
    """Each test's logics stop observing the scene when it ends (as the panel's do)."""
    yield
    while LOGICS:
        LOGICS.pop().cleanup()


def logic_with(cls, low=None):
    def factory(settings):
        engine = cls(settings)
        engine.low = dict(low or {})
        return engine

    LOGICS.append(OFLSAM2Logic(factory))
    return LOGICS[-1]


def ras_to_k(volume, ras) -> float:
    m = vtk.vtkMatrix4x4()
    volume.GetRASToIJKMatrix(m)
    return m.MultiplyPoint((*ras, 1.0))[2]


def test_the_next_slice_is_unpainted_where_the_result_is_unsure(mrml, ct):
    seg = painted_segmentation(mrml, ct, "Guided")
    assert ct.painted == [11, 20, 29]
    logic = logic_with(ConfidentFake, low={14: 0.1, 15: 0.1})
    result = logic.propagate(ct.volume, seg, [RIGHT_LUNG])
    nxt = result.nextSlice
    assert isinstance(nxt, NextSlice) and nxt.orientation == "axial" and nxt.axis == 0
    assert nxt.index in (14, 15) and 0 < nxt.score <= 1
    assert len(nxt.alternatives) == 2 and nxt.index not in nxt.alternatives
    assert not set(nxt.alternatives) & set(ct.painted)
    assert nxt.text() == f"Paint axial slice {nxt.index} next"
    assert "remove about" in nxt.details()
    # the point to jump to lies on that slice, inside the lung the engine predicted there
    assert ras_to_k(ct.volume, nxt.ras) == pytest.approx(nxt.index, abs=1e-6)
    conf = result.sliceConfidence
    assert isinstance(conf, SliceConfidence)
    assert conf.values.shape == (34,) and conf.values[14] == pytest.approx(0.1)
    assert conf.painted == (11, 20, 29) and conf.unsure() == [14, 15]
    assert "Review axial slices 14-15" in conf.summary()
    bar = conf.bar()
    assert len(bar) == 34 and bar[11] == bar[20] == bar[29] == "◆" and bar[14] == "▁"
    assert "#" in conf.html() and "Confidence by axial slice 0..33" in conf.html()


def test_the_slice_views_jump_to_the_suggested_slice(mrml, ct):
    seg = painted_segmentation(mrml, ct, "Jump")
    result = logic_with(ConfidentFake, low={24: 0.05}).propagate(ct.volume, seg, [RIGHT_LUNG])
    nxt = result.nextSlice
    assert nxt.index in (23, 24, 25)
    red = mrml.scene.AddNewNodeByClass("vtkMRMLSliceNode")
    red.SetLayoutName("Red")
    axial = red.GetSliceToRAS()
    axial.Identity()
    axial.SetElement(0, 0, -1.0)  # Slicer's axial view: screen right = patient left
    red.UpdateMatrices()
    try:
        assert OFLSAM2Logic.jumpToSlice(nxt)
        m = red.GetSliceToRAS()
        assert m.GetElement(2, 3) == pytest.approx(nxt.ras[2])  # the plane through the slice
        assert not OFLSAM2Logic.jumpToSlice(None)
    finally:
        mrml.scene.RemoveNode(red)


def test_slice_numbers_are_the_volumes_inside_a_slice_range(mrml, ct):
    seg = painted_segmentation(mrml, ct, "GuidedRange")
    logic = logic_with(ConfidentFake, low={26 - 8: 0.1})  # window slice 18 = volume slice 26
    result = logic.propagate(ct.volume, seg, [RIGHT_LUNG], slice_range=(8, 31))
    assert result.nextSlice.index in (25, 26, 27)
    assert ras_to_k(ct.volume, result.nextSlice.ras) == pytest.approx(result.nextSlice.index)
    conf = result.sliceConfidence
    assert (conf.lo, conf.hi) == (8, 31) and np.isnan(conf.values[:8]).all()
    assert conf.values[26] == pytest.approx(0.1) and len(conf.bar()) == 24


def test_an_engine_without_confidence_still_suggests_a_slice(mrml, ct):
    seg = painted_segmentation(mrml, ct, "NoConfidence")
    result = logic_with(FakeSegmenter).propagate(ct.volume, seg, [RIGHT_LUNG])
    assert result.nextSlice is not None and result.nextSlice.index not in ct.painted
    assert result.sliceConfidence.summary() == "No confidence reported for this propagation."
    assert set(result.sliceConfidence.bar()) == {"◆", "·"}


def test_confidence_bar_bins_long_volumes_by_their_least_sure_slice():
    values = np.linspace(0.0, 1.0, 300)
    values[150] = 0.05
    conf = SliceConfidence(0, "axial", values, (10,), 0, 299)
    cells = conf.cells(60)
    assert len(cells) == 60
    assert cells[2][0] == "◆"  # slice 10 falls in the third bin of five slices
    assert cells[30] == ("▁", pytest.approx(0.05))  # the bin holding slice 150
    assert cells[-1][0] == "█"
    assert conf.unsure()[0] == 0 and 150 in conf.unsure() and 10 not in conf.unsure()
    assert "Review axial slices 0-9, 11-149, 150" not in conf.summary()  # ranges merge
    assert "0-9, 11-" in conf.summary()


def test_the_go_to_slice_button_follows_the_suggestion():
    ui = fake_panel()
    node = types.SimpleNamespace(
        inputVolume=object(),
        segmentation=object(),
        segmentId="Segment_5",
        allVisibleSegments=False,
        limitSliceRange=False,
    )
    applyPanelState(ui, panelState(node, running=False, canUndo=True, hasSuggestion=True))
    assert ui.nextSliceButton.enabled is True
    applyPanelState(ui, panelState(node, running=True, canUndo=True, hasSuggestion=True))
    assert ui.nextSliceButton.enabled is False
    applyPanelState(ui, panelState(node, running=False, canUndo=True))
    assert ui.nextSliceButton.enabled is False
