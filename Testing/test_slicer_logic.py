"""oflsam2_slicer against a real MRML scene from the slicer-core package (no Slicer app).

Three layers:
- planning as plain numpy (no MRML): paint vs. propagated slices, axis, groups, merging;
- mechanics with a stand-in engine (instant, deterministic): what is read, what is written,
  undo, re-propagation memory, cancel, errors, export;
- the real engine (LiteMedSAM weights; SAM2 with random weights for mechanics), sharing one
  propagation between several checks to stay within a few minutes on two CPU cores.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from conftest import CT_PATH, RIGHT_LUNG_LITEMEDSAM_FLOOR, SEG_PATH, painted_slices  # noqa: E402

from oflsam2.errors import Cancelled, InputError, WeightsError  # noqa: E402
from oflsam2.metrics import dice  # noqa: E402
from oflsam2.progress import FIT, PROPAGATE, ProgressEvent  # noqa: E402
from oflsam2.settings import DEFAULTS, Settings  # noqa: E402
from oflsam2.volume import Geometry, find_annotated, read_labels  # noqa: E402
from oflsam2_slicer import (  # noqa: E402
    BackgroundTask,
    Device,
    DownloadCancelled,
    Model,
    OFLSAM2Logic,
    OFLSAM2UserError,
    PropagationCancelled,
    PropagationOptions,
    Quality,
    SliceAxis,
    TaskRunner,
    applyPanelState,
    mrmlio,
    panelState,
    planning,
    taskError,
    userError,
    waitWithEvents,
)
from oflsam2_slicer.task import DOWNLOAD  # noqa: E402

RIGHT_LUNG = "Segment_5"  # 'right lung' in the slicerio test segmentation
LEFT_LUNG = "Segment_6"
ALL_SEGMENTS = [f"Segment_{i}" for i in range(1, 8)]


# ---------------------------------------------------------------- scene


@pytest.fixture(scope="module")
def mrml():
    """A real MRML scene with the logics slicer.util needs, pointed at by slicer.mrmlScene/modules."""
    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    logics = {}
    for name, cls in (
        ("Colors", slicer.vtkSlicerColorLogic),
        ("Volumes", slicer.vtkSlicerVolumesLogic),
        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
    ):
        logic = cls()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(name, logic)
        logics[name] = logic
    saved = {k: getattr(slicer, k, None) for k in ("mrmlScene", "modules")}
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(
        volumes=types.SimpleNamespace(logic=lambda: logics["Volumes"]),
        segmentations=types.SimpleNamespace(logic=lambda: logics["Segmentations"]),
    )
    yield types.SimpleNamespace(scene=scene, app=app, logics=logics)
    scene.Clear(1)
    for k, v in saved.items():
        if v is None:
            delattr(slicer, k)
        else:
            setattr(slicer, k, v)


def load_volume(scene, path, name="CT"):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    node.SetAndObserveStorageNodeID(storage.GetID())
    node.CreateDefaultDisplayNodes()
    return node


def load_segmentation(scene, name="Seg"):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(SEG_PATH)
    assert storage.ReadData(node)
    node.CreateDefaultDisplayNodes()
    return node


def masks(seg, volume, ids=ALL_SEGMENTS):
    return {sid: OFLSAM2Logic.segmentMask(seg, sid, volume) for sid in ids}


def keep_slices(mask, slices, axis=0):
    out = np.zeros_like(mask)
    idx = [slice(None)] * 3
    idx[axis] = list(slices)
    out[tuple(idx)] = mask[tuple(idx)]
    return out


@pytest.fixture(scope="module")
def ct(mrml):
    volume = load_volume(mrml.scene, CT_PATH)
    truth = masks(load_segmentation(mrml.scene, "Truth"), volume)
    return types.SimpleNamespace(
        volume=volume, truth=truth, painted=painted_slices(truth[RIGHT_LUNG])
    )


def painted_segmentation(mrml, ct, name, sid=RIGHT_LUNG, slices=None):
    """The test segmentation with all but three slices of one segment erased."""
    seg = load_segmentation(mrml.scene, name)
    sparse = keep_slices(ct.truth[sid], slices or ct.painted)
    slicer.util.updateSegmentBinaryLabelmapFromArray(sparse, seg, sid, ct.volume)
    return seg


def oblique_volume(mrml, ct, name):
    """The same voxels under a rotated, shifted IJK-to-RAS (oblique acquisition)."""
    node = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetAndObserveImageData(ct.volume.GetImageData())
    m = vtk.vtkMatrix4x4()
    ct.volume.GetIJKToRASMatrix(m)
    ijk = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    a, b = np.radians(30), np.radians(-20)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    rotated = np.eye(4)
    rotated[:3, :3] = rz @ rx @ ijk[:3, :3]
    rotated[:3, 3] = ijk[:3, 3] + [12.5, -7.0, 30.0]
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, rotated[r, c])
    node.SetIJKToRASMatrix(out)
    node.CreateDefaultDisplayNodes()
    return node


def oblique_copy(mrml, ct, name, painted):
    """An oblique volume with the same voxels and a segmentation holding the same arrays."""
    node = oblique_volume(mrml, ct, name)
    seg = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name}Seg")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(node)
    for sid in ALL_SEGMENTS:
        seg.GetSegmentation().AddEmptySegment(sid, sid)
        mask = keep_slices(ct.truth[sid], painted) if sid == RIGHT_LUNG else ct.truth[sid]
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg, sid, node)
    return node, seg


# ---------------------------------------------------------------- stand-in engine


class FakeSegmenter:
    """The engine's API with a trivial method: every slice copies the nearest annotated slice."""

    backbone = types.SimpleNamespace(name="fake", weights="")

    def __init__(self, settings, delay=0.0):
        self.settings = settings
        self.delay = delay
        self.encoder_calls = 0
        self._array = None
        self._encoded: set[int] = set()
        self.fits: list[tuple[int, list[int], np.ndarray]] = []
        self.volumes: list[tuple[np.ndarray, Geometry]] = []

    def set_volume(self, array, geometry=None, modality=None):
        if array is not self._array:
            self._encoded = set()
        self._array = array
        self.volumes.append((array, geometry))

    def fit(self, sparse, slices=None, axis="auto", progress=None, cancel=None):
        self.ann = find_annotated(sparse, axis, slices)
        self.sparse = sparse.copy()
        self.fits.append((self.ann.axis, list(self.ann.slices), sparse.copy()))
        n = self._array.shape[self.ann.axis]
        new = [t for t in range(n) if t not in self._encoded]
        self._encoded |= set(new)
        self.encoder_calls += len(new)
        self._new = len(new)

    def propagate(self, progress=None, cancel=None):
        axis, slices = self.ann.axis, np.asarray(self.ann.slices)
        n = self._array.shape[axis]
        segment = min(self.ann.per_segment)
        labels = np.zeros_like(self.sparse)
        for t in range(n):
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled")
            if self.delay:
                time.sleep(self.delay)
            if progress is not None:
                progress(ProgressEvent(PROPAGATE, segment, t + 1, n))
            nearest = int(slices[np.argmin(np.abs(slices - t))])
            idx = [slice(None)] * 3
            idx[axis] = t
            src = [slice(None)] * 3
            src[axis] = nearest
            labels[tuple(idx)] = self.sparse[tuple(src)]
        return types.SimpleNamespace(
            labels=labels, timings={"propagate": 0.0}, encoded_slices=self._new
        )


@pytest.fixture
def fake_logic():
    made = []

    def factory(settings):
        assert isinstance(settings, Settings)
        made.append(FakeSegmenter(settings))
        return made[-1]

    logic = OFLSAM2Logic(factory)
    logic.made = made
    return logic


def nearest_copy(mask, slices, axis=0):
    """What FakeSegmenter should produce for one segment."""
    slices = np.asarray(sorted(slices))
    out = np.zeros_like(mask)
    for t in range(mask.shape[axis]):
        nearest = int(slices[np.argmin(np.abs(slices - t))])
        out[t] = mask[nearest]
    return out


# ---------------------------------------------------------------- reading


def test_volume_geometry_is_the_files(mrml, ct, sample_ct):
    array, geometry = OFLSAM2Logic.volumeInput(ct.volume)
    ref = sample_ct
    assert geometry.differences(ref.geometry) == []
    np.testing.assert_array_equal(array, ref.array)
    assert array is not slicer.util.arrayFromVolume(ct.volume)  # a private copy


def test_segments_come_on_the_volume_grid(mrml, ct, sample_labels):
    labels = sample_labels
    for i, sid in enumerate(ALL_SEGMENTS, start=1):
        np.testing.assert_array_equal(ct.truth[sid], (labels.array == i).astype(np.uint8))


def test_oblique_geometry_is_read_exactly(mrml, ct):
    node = oblique_volume(mrml, ct, "ObliqueGeometry")
    _, geometry = OFLSAM2Logic.volumeInput(node)
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    expected = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    np.testing.assert_allclose(geometry.ijk_to_ras(), expected, atol=1e-9)
    mrml.scene.RemoveNode(node)


# ---------------------------------------------------------------- planning (plain numpy, no MRML)

EYE = np.eye(4)  # IJK-to-RAS of a plain axial volume: array axis 0 = k = S (axial slices)


def axial(slices, shape=(10, 12, 12), rows=slice(3, 9), cols=slice(3, 9)):
    """A 0/1 mask painted with the same square on the given axial slices (array axis 0)."""
    mask = np.zeros(shape, np.uint8)
    for t in slices:
        mask[t, rows, cols] = 1
    return mask


def sagittal(slices, shape=(10, 12, 12)):
    """A 0/1 mask painted on the given sagittal slices (array axis 2) over axial slices 1..8."""
    mask = np.zeros(shape, np.uint8)
    for t in slices:
        mask[1:9, 2:9, t] = 1
    return mask


def test_planning_tells_paint_from_propagated_slices():
    painted = axial([2, 6])
    written = axial(range(2, 7))  # the last propagation filled slices 3, 4 and 5
    memory = planning.WriteMemory.of(0, [2, 6], written)
    np.testing.assert_array_equal(memory.mask(), written > 0)
    paint, used, kept = planning.paintOf(written, memory)
    assert used is memory and kept == [2, 6]
    np.testing.assert_array_equal(paint, painted)
    corrected = written.copy()
    corrected[4, 3:5] = 0  # a correction of slice 4 ...
    corrected[5] = 0  # ... and slice 5 erased: both become annotation
    paint, used, kept = planning.paintOf(corrected, memory)
    assert kept == [2, 4, 5, 6] and not paint[3].any() and not paint[5].any()
    np.testing.assert_array_equal(paint[4], corrected[4])
    # every propagated slice changed (undone by another tool): the memory is stale
    paint, used, kept = planning.paintOf(painted, memory)
    assert used is None and kept == [] and paint is painted
    assert planning.paintOf(painted, None) == (painted, None, [])


def test_planning_resolves_and_checks_the_slice_axis():
    assert [planning.orientationOfAxis(EYE, a) for a in range(3)] == [
        "axial",
        "coronal",
        "sagittal",
    ]
    assert planning.arrayAxisFor("sagittal", EYE) == 2
    side = {"b": sagittal([3, 8])}
    assert planning.resolveAxis(side, {"b": None}, "auto", EYE) == (2, False)
    assert planning.resolveAxis(side, {"b": None}, "Axial", EYE) == (0, True)
    assert planning.resolveAxis(side, {"b": None}, "1", EYE) == (1, True)
    remembered = planning.WriteMemory.of(1, [4], axial([4]))
    assert planning.resolveAxis(side, {"b": remembered}, "auto", EYE) == (1, False)
    for bad in (5, "oblique"):
        with pytest.raises(OFLSAM2UserError, match="Slice axis must be"):
            planning.resolveAxis(side, {"b": None}, bad, EYE)
    with pytest.raises(OFLSAM2UserError, match="paint the structure"):
        planning.resolveAxis({"e": np.zeros((4, 4, 4), np.uint8)}, {"e": None}, "auto", EYE)
    names = {"a": "liver", "b": "spleen"}
    paints = {"a": axial([2, 6]), "b": sagittal([3, 8])}
    planning.checkPaintAxis({"a": paints["a"]}, names, 0, True, EYE)
    with pytest.raises(OFLSAM2UserError, match=r"Segments 'liver' \(axial\) and 'spleen'"):
        planning.checkPaintAxis(paints, names, 0, False, EYE)
    with pytest.raises(OFLSAM2UserError, match="'spleen' is painted on sagittal slices but"):
        planning.checkPaintAxis({"b": paints["b"]}, names, 0, True, EYE)


def test_planning_finds_a_second_orientation_in_one_segment():
    axial = np.zeros((20, 30, 30), np.uint8)
    axial[[3, 10], 5:20, 5:20] = 1
    assert planning.crossAxis(axial, 0) is None
    cluster = np.zeros_like(axial)
    cluster[9:12, 5:20, 5:20] = 1  # three neighbouring slices: one orientation
    cluster[9:12, 10, 4] = 1  # a one-voxel sliver on each: not a stroke
    assert planning.crossAxis(cluster, 0) is None
    both = axial.copy()
    both[2:15, 5:20, 12] = 1  # a stroke drawn in the sagittal view
    assert planning.crossAxis(both, 0) == 2
    with pytest.raises(OFLSAM2UserError, match="'tumor' is painted on both axial and sagittal"):
        planning.findLayout({"t": both}, {"t": None}, {"t": "tumor"}, "auto", None, np.eye(4))
    coronal = axial.copy()
    coronal[6:13, 14, 5:20] = 1  # crosses painted slice 10: the gaps stay, still refused
    with pytest.raises(OFLSAM2UserError, match="axial and coronal"):
        planning.findLayout({"t": coronal}, {"t": None}, {"t": "tumor"}, "axial", None, np.eye(4))


def test_planning_window_groups_and_merge():
    assert planning.sliceWindow(10, None) == (0, 9)
    assert planning.sliceWindow(10, (8, 3)) == (3, 8)
    assert planning.sliceWindow(10, (5, 40)) == (5, 9)
    with pytest.raises(OFLSAM2UserError, match="outside the volume's slices 0..9"):
        planning.sliceWindow(10, (20, 30))
    originals = {"a": axial([2, 6]), "b": axial([2, 6], rows=slice(0, 2)), "c": axial([3, 8])}
    names = {"a": "liver", "b": "spleen", "c": "kidney"}
    memories = dict.fromkeys(originals)
    layout = planning.findLayout(originals, memories, names, "auto", (1, 8), EYE)
    assert (layout.axis, layout.orientation, layout.lo, layout.hi) == (0, "axial", 1, 8)
    assert layout.annotated == {"a": [2, 6], "b": [2, 6], "c": [3, 8]}
    groups = planning.groupSegments(["a", "b", "c"], layout)
    assert [(g.segmentIds, g.values, g.slices) for g in groups] == [
        (["a", "b"], [1, 2], [1, 5]),  # window coordinates: slice 2 is the window's slice 1
        (["c"], [3], [2, 7]),
    ]
    assert groups[0].sparse.shape == (8, 12, 12)
    assert set(np.unique(groups[0].sparse)) == {0, 1, 2}
    # the engine answers "everywhere" for each segment: inside the window only, paint kept
    labels = [np.full(g.sparse.shape, g.values[0], np.uint8) for g in groups]
    merged = planning.merge(layout, groups, labels, originals)
    a = merged["a"]
    assert a[1:9][[0, 2, 3, 4, 6, 7]].all() and not a[[0, 9]].any()
    np.testing.assert_array_equal(a[[2, 6]], originals["a"][[2, 6]])
    np.testing.assert_array_equal(merged["b"][[1, 3, 4, 5, 7, 8]], 0)  # label 2 never answered
    assert planning.slicesChanged(a, originals["a"], 0) == 6
    with pytest.raises(RuntimeError, match="2 groups"):
        planning.merge(layout, groups, labels[:1], originals)
    with pytest.raises(OFLSAM2UserError, match="'kidney' has no painted slice within slices 6..7"):
        planning.findLayout(originals, memories, names, "auto", (6, 7), EYE)


# ---------------------------------------------------------------- mechanics (stand-in engine)


def test_writes_only_the_chosen_segment(mrml, ct, fake_logic):
    seg = painted_segmentation(mrml, ct, "Mechanics")
    before = masks(seg, ct.volume)
    nodes = node_ids(mrml.scene)
    result = fake_logic.propagate(ct.volume, seg, [RIGHT_LUNG])
    assert node_ids(mrml.scene) == nodes  # reading and writing segments leave no node behind
    after = masks(seg, ct.volume)
    for sid in ALL_SEGMENTS:
        if sid != RIGHT_LUNG:
            np.testing.assert_array_equal(after[sid], before[sid], err_msg=sid)
    expected = nearest_copy(before[RIGHT_LUNG], ct.painted)
    np.testing.assert_array_equal(after[RIGHT_LUNG], expected)
    for t in ct.painted:
        np.testing.assert_array_equal(after[RIGHT_LUNG][t], before[RIGHT_LUNG][t])
    assert result.axis == 0 and result.orientation == "axial"
    assert result.annotatedSlices[RIGHT_LUNG] == ct.painted
    assert result.slicesWritten[RIGHT_LUNG] == len(find_annotated(expected, 0).slices) - len(
        ct.painted
    )
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    segment = seg.GetSegmentation().GetSegment(RIGHT_LUNG)
    assert logic.GetSegmentStatus(segment) == logic.InProgress
    tag = vtk.reference("")
    assert segment.GetTag("Segmentation.Status", tag) and str(tag) == "inprogress"
    # the engine got the volume's exact grid and the painted slices only
    fake = fake_logic.made[-1]
    array, geometry = fake.volumes[-1]
    assert geometry.differences(OFLSAM2Logic.volumeInput(ct.volume)[1]) == []
    axis, slices, sparse = fake.fits[-1]
    assert (axis, slices) == (0, ct.painted)
    assert set(np.unique(sparse)) == {0, 1}


def test_undo_restores_the_segmentation_and_leaves_scene_undo_alone(mrml, ct, fake_logic):
    seg = painted_segmentation(mrml, ct, "Undo")
    before = masks(seg, ct.volume)
    undoEnabled, levels = seg.GetUndoEnabled(), mrml.scene.GetNumberOfUndoLevels()
    fake_logic.propagate(ct.volume, seg, [RIGHT_LUNG])
    assert not np.array_equal(masks(seg, ct.volume, [RIGHT_LUNG])[RIGHT_LUNG], before[RIGHT_LUNG])
    # no side effect on the scene's undo (off in Slicer by default): nothing switched on or saved
    assert seg.GetUndoEnabled() == undoEnabled
    assert mrml.scene.GetNumberOfUndoLevels() == levels and not mrml.scene.GetUndoFlag()
    assert fake_logic.canUndo(seg)
    assert fake_logic.undo(seg)  # the logic's own segmentation history
    after = masks(seg, ct.volume)
    for sid in ALL_SEGMENTS:
        np.testing.assert_array_equal(after[sid], before[sid], err_msg=sid)
    assert not fake_logic.canUndo(seg)


def test_before_write_hook_runs_before_anything_is_written(mrml, ct, fake_logic):
    seg = painted_segmentation(mrml, ct, "Hook")
    before = masks(seg, ct.volume, [RIGHT_LUNG])[RIGHT_LUNG]
    seen = []
    fake_logic.propagate(
        ct.volume,
        seg,
        [RIGHT_LUNG],
        beforeWrite=lambda: seen.append(masks(seg, ct.volume, [RIGHT_LUNG])),
    )
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0][RIGHT_LUNG], before)


def test_repropagation_takes_corrections_as_paint(mrml, ct, fake_logic):
    seg = painted_segmentation(mrml, ct, "Repropagate")
    fake_logic.propagate(ct.volume, seg, [RIGHT_LUNG])
    fake = fake_logic.made[-1]
    calls = fake.encoder_calls
    propagated = masks(seg, ct.volume, [RIGHT_LUNG])[RIGHT_LUNG]
    # correct one propagated slice and erase another: both become annotation
    fourth = sorted(set(find_annotated(propagated, 0).slices) - set(ct.painted))[len(ct.painted)]
    erased = sorted(set(find_annotated(propagated, 0).slices) - set(ct.painted) - {fourth})[0]
    corrected = propagated.copy()
    corrected[fourth] = ct.truth[RIGHT_LUNG][fourth]
    corrected[erased] = 0
    slicer.util.updateSegmentBinaryLabelmapFromArray(corrected, seg, RIGHT_LUNG, ct.volume)
    result = fake_logic.propagate(ct.volume, seg, [RIGHT_LUNG])
    assert fake_logic.made[-1] is fake  # same segmenter, same array object: cache kept
    assert fake.encoder_calls == calls
    assert fake.volumes[-1][0] is fake.volumes[0][0]
    expected = sorted(set(ct.painted) | {fourth, erased})
    assert fake.fits[-1][1] == expected
    assert result.annotatedSlices[RIGHT_LUNG] == expected
    after = masks(seg, ct.volume, [RIGHT_LUNG])[RIGHT_LUNG]
    np.testing.assert_array_equal(after[fourth], ct.truth[RIGHT_LUNG][fourth])
    assert not after[erased].any()


def test_memory_is_dropped_after_undo(mrml, ct, fake_logic):
    seg = painted_segmentation(mrml, ct, "UndoMemory")
    fake_logic.propagate(ct.volume, seg, [RIGHT_LUNG])
    # an undo by another tool (here: writing the painted state back) makes the memory stale
    slicer.util.updateSegmentBinaryLabelmapFromArray(
        keep_slices(ct.truth[RIGHT_LUNG], ct.painted), seg, RIGHT_LUNG, ct.volume
    )
    result = fake_logic.propagate(ct.volume, seg, [RIGHT_LUNG])
    assert result.annotatedSlices[RIGHT_LUNG] == ct.painted


def test_segments_painted_on_different_slices_are_fitted_apart(mrml, ct, fake_logic):
    seg = load_segmentation(mrml.scene, "Groups")
    left = painted_slices(ct.truth[LEFT_LUNG])
    right = [t + 1 for t in ct.painted]
    for sid, slices in ((RIGHT_LUNG, right), (LEFT_LUNG, left)):
        slicer.util.updateSegmentBinaryLabelmapFromArray(
            keep_slices(ct.truth[sid], slices), seg, sid, ct.volume
        )
    before = masks(seg, ct.volume)
    result = fake_logic.propagate(ct.volume, seg, [RIGHT_LUNG, LEFT_LUNG])
    fake = fake_logic.made[-1]
    fits = {tuple(f[1]): set(np.unique(f[2])) - {0} for f in fake.fits}
    assert fits == {tuple(right): {1}, tuple(left): {2}}  # an unpainted slice is not 'absent'
    after = masks(seg, ct.volume)
    np.testing.assert_array_equal(after[RIGHT_LUNG], nearest_copy(before[RIGHT_LUNG], right))
    np.testing.assert_array_equal(after[LEFT_LUNG], nearest_copy(before[LEFT_LUNG], left))
    assert result.annotatedSlices == {RIGHT_LUNG: right, LEFT_LUNG: left}


def test_same_slices_share_one_fit(mrml, ct, fake_logic):
    seg = load_segmentation(mrml.scene, "OneGroup")
    for sid in (RIGHT_LUNG, LEFT_LUNG):
        slicer.util.updateSegmentBinaryLabelmapFromArray(
            keep_slices(ct.truth[sid], ct.painted), seg, sid, ct.volume
        )
    display = seg.GetDisplayNode()
    for sid in ALL_SEGMENTS:
        display.SetSegmentVisibility(sid, sid in (RIGHT_LUNG, LEFT_LUNG))
    fake_logic.propagate(ct.volume, seg, allVisible=True)
    fake = fake_logic.made[-1]
    assert len(fake.fits) == 1 and set(np.unique(fake.fits[0][2])) == {0, 1, 2}


def test_slice_range_limits_what_is_written(mrml, ct, fake_logic):
    seg = painted_segmentation(mrml, ct, "Range")
    before = masks(seg, ct.volume, [RIGHT_LUNG])[RIGHT_LUNG]
    lo, hi = ct.painted[0] - 1, ct.painted[1] + 1
    fake_logic.propagate(ct.volume, seg, [RIGHT_LUNG], slice_range=(lo, hi))
    after = masks(seg, ct.volume, [RIGHT_LUNG])[RIGHT_LUNG]
    np.testing.assert_array_equal(after[:lo], before[:lo])
    np.testing.assert_array_equal(after[hi + 1 :], before[hi + 1 :])
    expected = nearest_copy(before, ct.painted[:2])
    np.testing.assert_array_equal(after[lo : hi + 1], expected[lo : hi + 1])
    fake = fake_logic.made[-1]
    array, geometry = fake.volumes[-1]
    assert array.shape[0] == hi - lo + 1
    full = OFLSAM2Logic.volumeInput(ct.volume)[1]
    np.testing.assert_allclose(
        geometry.ijk_to_ras() @ [0, 0, 0, 1], full.ijk_to_ras() @ [0, 0, lo, 1]
    )


def test_oblique_volume_reaches_the_engine_unchanged(mrml, ct, fake_logic):
    """Same voxels, rotated IJK-to-RAS: same arrays to the engine, same labels back on its own grid."""
    straight = painted_segmentation(mrml, ct, "StraightFake")
    node, oblique = oblique_copy(mrml, ct, "ObliqueFake", ct.painted)
    fake_logic.propagate(ct.volume, straight, [RIGHT_LUNG])
    first = fake_logic.made[-1]
    fake_logic.propagate(node, oblique, [RIGHT_LUNG])
    second = fake_logic.made[-1]
    assert second is not first  # one segmenter per volume node
    np.testing.assert_array_equal(second.volumes[-1][0], first.volumes[-1][0])
    np.testing.assert_array_equal(second.fits[-1][2], first.fits[-1][2])
    g1, g2 = first.volumes[-1][1], second.volumes[-1][1]
    assert g1.spacing == pytest.approx(g2.spacing) and g1.direction != pytest.approx(g2.direction)
    got_a, got_b = masks(straight, ct.volume), masks(oblique, node)
    for sid in ALL_SEGMENTS:
        np.testing.assert_array_equal(got_b[sid], got_a[sid], err_msg=sid)


def test_default_segment_is_the_editors_selection(mrml, ct):
    seg = load_segmentation(mrml.scene, "Selected")
    assert OFLSAM2Logic.defaultSegmentIds(seg) == ["Segment_1"]
    editor = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetAndObserveSegmentationNode(seg)
    editor.SetSelectedSegmentID(LEFT_LUNG)
    try:
        assert OFLSAM2Logic.defaultSegmentIds(seg) == [LEFT_LUNG]
    finally:
        mrml.scene.RemoveNode(editor)
    seg.GetDisplayNode().SetSegmentVisibility("Segment_2", False)
    assert "Segment_2" not in OFLSAM2Logic.defaultSegmentIds(seg, allVisible=True)


def test_cancel_leaves_the_segmentation_unchanged(mrml, ct):
    gate = threading.Event()

    class Slow(FakeSegmenter):
        def propagate(self, progress=None, cancel=None):
            gate.set()
            return super().propagate(progress, cancel)

    logic = OFLSAM2Logic(lambda settings: Slow(settings, delay=0.05))
    seg = painted_segmentation(mrml, ct, "Cancel")
    before = masks(seg, ct.volume)
    job = logic.startPropagation(ct.volume, seg, [RIGHT_LUNG])
    assert gate.wait(10)
    job.cancel()
    status = job.wait(10)
    assert status.state == "cancelled"
    with pytest.raises(PropagationCancelled, match="not changed"):
        logic.finishPropagation(job)
    after = masks(seg, ct.volume)
    for sid in ALL_SEGMENTS:
        np.testing.assert_array_equal(after[sid], before[sid], err_msg=sid)


def test_edits_during_propagation_are_not_overwritten(mrml, ct):
    gate, release = threading.Event(), threading.Event()

    class Held(FakeSegmenter):
        def propagate(self, progress=None, cancel=None):
            gate.set()
            release.wait(10)
            return super().propagate(progress, cancel)

    logic = OFLSAM2Logic(Held)
    seg = painted_segmentation(mrml, ct, "EditedMeanwhile")
    job = logic.startPropagation(ct.volume, seg, [RIGHT_LUNG])
    assert gate.wait(10)
    with pytest.raises(OFLSAM2UserError, match="already running"):
        logic.startPropagation(ct.volume, seg, [RIGHT_LUNG])
    edited = keep_slices(ct.truth[RIGHT_LUNG], ct.painted + [ct.painted[0] + 1])
    slicer.util.updateSegmentBinaryLabelmapFromArray(edited, seg, RIGHT_LUNG, ct.volume)
    release.set()
    assert job.wait(10).state == "done"
    with pytest.raises(OFLSAM2UserError, match="edited while propagating"):
        logic.finishPropagation(job)
    np.testing.assert_array_equal(masks(seg, ct.volume, [RIGHT_LUNG])[RIGHT_LUNG], edited)


def test_progress_and_status_line():
    seen = threading.Event()
    step = threading.Event()

    def work(progress, cancel):
        progress(ProgressEvent(PROPAGATE, 5, 2, 10))
        seen.set()
        step.wait(10)
        progress(ProgressEvent(FIT, 5, 1, 4))
        seen.set()
        cancel.wait(10)
        progress(ProgressEvent(PROPAGATE, 5, 3, 10))  # raises Cancelled: cancel was asked for

    task = BackgroundTask(work, names={5: "right lung"})
    assert task.poll().text() == "Ready"
    task.start()
    assert seen.wait(10)
    status = task.poll()
    assert (status.stage, status.done, status.total, status.state) == (
        "propagate 'right lung'",
        2,
        10,
        "running",
    )
    assert status.event == ProgressEvent(PROPAGATE, 5, 2, 10)
    assert "2/10" in status.text() and "s/slice" in status.text()
    seen.clear()
    step.set()
    assert seen.wait(10)
    status = task.poll()
    assert status.stage == "fit 'right lung'" and "1/4" in status.text()
    assert "s/step" in status.text()  # training steps, not slices
    task.cancel()
    assert task.wait(10).state == "cancelled"


# ---------------------------------------------------------------- the GUI thread's wait (issue 9)

# In Slicer the main thread holds the GIL while Qt's event loop runs (PythonQt never releases
# it). A C function called through ctypes.PyDLL keeps the GIL too: calling usleep that way
# between poll callbacks is an event loop that holds the GIL, as Slicer's does.
_GIL_HOLDING_C = ctypes.PyDLL(None)
# OFLSAM2_GIL_TEST_DESIGN=timer runs the propagation test with the old design (a thread polled
# by a 200 ms timer): it must then fail. Default: the panel's design, waitWithEvents.
GIL_DESIGN = os.environ.get("OFLSAM2_GIL_TEST_DESIGN", "wait")
GIL_WORK_SECONDS = 1.5  # pure-Python work of the stand-in engine, with a free main thread
GIL_MAX_SLOWDOWN = 1.5


def hold_gil(seconds: float) -> None:
    """What Slicer's event loop does between two Python callbacks: C code holding the GIL."""
    _GIL_HOLDING_C.usleep(int(seconds * 1e6))


def spin(iterations: int) -> int:
    """Pure-Python work: holds the GIL all along (as Python code between torch calls does)."""
    x = 0
    for i in range(iterations):
        x += i * i
    return x


def spin_rate() -> float:
    """Iterations of :func:`spin` per second on this machine, now."""
    t0 = time.perf_counter()
    spin(200_000)
    return 200_000 / max(time.perf_counter() - t0, 1e-6)


def wait_like_slicer(job, design: str, deadline: float = float("inf")) -> None:
    """Wait for ``job`` as the panel does in Slicer, the event loop holding the GIL.

    ``wait``: :func:`waitWithEvents`, whose ``processEvents`` is 2 ms of event handling that
    holds the GIL. ``timer`` (the old design): Qt idles 200 ms holding the GIL, then the
    timer's poll callback runs.
    """
    if design == "timer":
        while not job.poll().finished and time.perf_counter() < deadline:
            hold_gil(0.2)
            job.poll().text()  # the poll callback
    else:
        waitWithEvents(job, lambda: hold_gil(0.002), lambda status: status.text())


class GilBoundSegmenter(FakeSegmenter):
    """The stand-in engine with ``iterations`` of pure-Python work per propagated slice."""

    iterations = 0

    def propagate(self, progress=None, cancel=None):
        n = self._array.shape[self.ann.axis]
        for t in range(n):
            spin(self.iterations)
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled")
            if progress is not None:
                progress(ProgressEvent(PROPAGATE, 5, t + 1, n))
        return super().propagate(None, cancel)


def test_the_emulated_event_loop_starves_a_timer_polled_thread():
    """The emulation is faithful: a worker polled by a timer barely runs (the old design)."""
    rate = spin_rate()
    steps = 20

    def work(progress, cancel):
        for t in range(steps):
            spin(int(rate * 0.5 / steps))  # 0.5 s with a free main thread
            progress(ProgressEvent(PROPAGATE, None, t + 1, steps))

    task = BackgroundTask(work)
    task.start()
    wait_like_slicer(task, "timer", deadline=time.perf_counter() + 1.0)
    status = task.poll()
    assert not status.finished and status.done < steps // 2, status.text()
    task.cancel()
    assert task.wait(30).state == "cancelled"


def test_propagation_runs_at_full_speed_while_the_event_loop_holds_the_gil(mrml, ct):
    """Issue 9: the GUI waits so that the worker runs at full speed in Slicer's condition."""
    seg = painted_segmentation(mrml, ct, "GilBound")
    GilBoundSegmenter.iterations = int(
        spin_rate() * GIL_WORK_SECONDS / ct.volume.GetImageData().GetDimensions()[2]
    )
    logic = OFLSAM2Logic(GilBoundSegmenter)

    def timed(wait) -> float:
        job = logic.startPropagation(ct.volume, seg, [RIGHT_LUNG])
        t0 = time.perf_counter()
        wait(job)
        seconds = time.perf_counter() - t0
        logic.finishPropagation(job)
        assert logic.undo(seg)
        return seconds

    timed(lambda job: job.wait())  # warm up: the first run reads the volume
    frees, helds = [], []
    for _ in range(3):  # the build machines are shared: the best of up to three runs each
        frees.append(timed(lambda job: job.wait()))
        helds.append(timed(lambda job: wait_like_slicer(job, GIL_DESIGN)))
        print(
            f"design {GIL_DESIGN}: free main thread {frees[-1]:.2f} s, "
            f"GIL-holding event loop {helds[-1]:.2f} s"
        )
        if min(helds) <= GIL_MAX_SLOWDOWN * min(frees):
            break
    assert min(helds) <= GIL_MAX_SLOWDOWN * min(frees), (
        f"{GIL_DESIGN}: free {[round(f, 2) for f in frees]} s, "
        f"GIL held {[round(h, 2) for h in helds]} s"
    )


class ShownError(contextlib.AbstractContextManager):
    """What slicer.util.tryWithErrorDisplay does: show the error, then raise it again."""

    def __init__(self, shown: list) -> None:
        self.shown = shown

    def __exit__(self, kind, exc, tb):
        if exc is not None:
            self.shown.append(exc)
        return False


def fake_panel():
    names = (
        "propagateButton cancelButton undoButton exportButton segmentSelector firstSliceSpinBox "
        "lastSliceSpinBox inputsCollapsibleButton modelCollapsibleButton advancedCollapsibleButton "
        "nextSliceButton"
    )
    return types.SimpleNamespace(
        **{n: types.SimpleNamespace(enabled=None, toolTip="") for n in names.split()}
    )


def test_panel_is_given_back_after_an_unexpected_error():
    """Issue 9 item 2: after a bug in finishing (or starting) a task the panel is not "running"."""
    ui = fake_panel()
    node = types.SimpleNamespace(
        inputVolume=object(),
        segmentation=object(),
        segmentId="Segment_5",
        allVisibleSegments=False,
        limitSliceRange=True,
    )
    runner = TaskRunner(lambda: applyPanelState(ui, panelState(node, runner.running, True)))
    runner.refresh()
    idle = (True, False, True, True, True)

    def state():
        return (
            ui.propagateButton.enabled,
            ui.cancelButton.enabled,
            ui.undoButton.enabled,
            ui.segmentSelector.enabled and ui.advancedCollapsibleButton.enabled,
            ui.firstSliceSpinBox.enabled,
        )

    assert state() == idle
    shown, during = [], []

    def start():
        task = BackgroundTask(lambda progress, cancel: time.sleep(0.3))
        task.start()
        return task

    def finish(task):
        with ShownError(shown):
            raise RuntimeError("a bug while writing the result")

    with pytest.raises(RuntimeError, match="a bug"):
        runner.run(start, finish, lambda status: during.append(state()))
    assert during and set(during) == {(False, True, False, False, False)}
    assert len(shown) == 1 and not runner.running
    assert state() == idle  # Propagate enabled, Cancel disabled again

    def broken_start():
        with ShownError(shown):
            raise RuntimeError("a bug while starting")

    with pytest.raises(RuntimeError, match="starting"):
        runner.run(broken_start, finish)
    assert state() == idle and not runner.running
    assert runner.run(lambda: None, finish) is None and state() == idle  # nothing to run
    node.segmentId = ""
    runner.refresh()
    assert not ui.propagateButton.enabled and "Select" in ui.propagateButton.toolTip


def test_cancel_from_the_event_loop_stops_the_task():
    """Cancel pressed while the GUI thread waits (processEvents dispatches the click)."""
    clicks = []

    def work(progress, cancel):
        for t in range(1000):
            time.sleep(0.01)
            progress(ProgressEvent(PROPAGATE, None, t + 1, 1000))

    task = BackgroundTask(work)
    task.start()

    def processEvents():
        clicks.append(1)
        if len(clicks) == 3:
            task.cancel()

    status = waitWithEvents(task, processEvents)
    assert status.state == "cancelled" and status.done < 1000


def test_cancelled_download_is_not_a_cancelled_propagation():
    def work(progress, cancel):
        cancel.wait(10)
        progress(ProgressEvent("downloading", None, 1, 10))

    task = BackgroundTask(work, kind=DOWNLOAD)
    task.start()
    task.cancel()
    status = task.wait(10)
    assert status.state == "cancelled"
    error = taskError(status)
    assert isinstance(error, DownloadCancelled) and not isinstance(error, PropagationCancelled)
    assert str(error).startswith("Download cancelled")
    assert status.text().startswith("Download cancelled")


def test_engine_errors_become_one_line_user_errors():
    error = userError(WeightsError("weights are corrupt: download them again\ndetails"))
    assert isinstance(error, OFLSAM2UserError)
    assert str(error) == "weights are corrupt: download them again"
    missing = userError(ModuleNotFoundError("No module named 'torch'", name="torch"))
    assert str(missing).startswith("The OFL-SAM2 engine cannot load (torch is missing)")
    assert userError(RuntimeError("a bug")) is None  # shown with its traceback instead
    failed = types.SimpleNamespace(state="failed", error=InputError("bad slice\nmore"))
    assert str(taskError(failed)) == "bad slice"


# ---------------------------------------------------------------- clear errors


def _sphere_volume(mrml, dims, components=1, name="Odd"):
    image = vtk.vtkImageData()
    image.SetDimensions(*dims)
    image.AllocateScalars(vtk.VTK_SHORT, components)
    cls = "vtkMRMLScalarVolumeNode" if components == 1 else "vtkMRMLVectorVolumeNode"
    node = mrml.scene.AddNewNodeByClass(cls, name)
    node.SetAndObserveImageData(image)
    return node


def test_error_no_volume_or_segmentation(mrml, ct, fake_logic):
    seg = painted_segmentation(mrml, ct, "Errors1")
    with pytest.raises(OFLSAM2UserError, match="No input volume"):
        fake_logic.propagate(None, seg)
    with pytest.raises(OFLSAM2UserError, match="No segmentation"):
        fake_logic.propagate(ct.volume, None)


def test_error_segment_not_painted(mrml, ct, fake_logic):
    seg = load_segmentation(mrml.scene, "Errors2")
    seg.GetSegmentation().AddEmptySegment("tumor", "tumor")
    with pytest.raises(OFLSAM2UserError, match="Segment 'tumor' has no painted slice"):
        fake_logic.propagate(ct.volume, seg, ["tumor"])
    with pytest.raises(OFLSAM2UserError, match="no segment 'nope'"):
        fake_logic.propagate(ct.volume, seg, ["nope"])


def test_error_2d_and_4d_volumes(mrml, ct, fake_logic):
    seg = painted_segmentation(mrml, ct, "Errors3")
    flat = _sphere_volume(mrml, (64, 64, 1), name="Flat")
    with pytest.raises(OFLSAM2UserError, match="is 2D"):
        fake_logic.propagate(flat, seg, [RIGHT_LUNG])
    four = _sphere_volume(mrml, (16, 16, 8), components=3, name="Vector")
    with pytest.raises(OFLSAM2UserError, match="is 4D"):
        fake_logic.propagate(four, seg, [RIGHT_LUNG])


def test_error_paint_on_different_axes(mrml, ct, fake_logic):
    seg = load_segmentation(mrml.scene, "Errors4")
    slicer.util.updateSegmentBinaryLabelmapFromArray(
        keep_slices(ct.truth[RIGHT_LUNG], ct.painted), seg, RIGHT_LUNG, ct.volume
    )
    sagittal = painted_slices(ct.truth[LEFT_LUNG], axis=2)
    slicer.util.updateSegmentBinaryLabelmapFromArray(
        keep_slices(ct.truth[LEFT_LUNG], sagittal, axis=2), seg, LEFT_LUNG, ct.volume
    )
    with pytest.raises(OFLSAM2UserError, match="different slice orientations"):
        fake_logic.propagate(ct.volume, seg, [RIGHT_LUNG, LEFT_LUNG])
    with pytest.raises(
        OFLSAM2UserError, match="painted on sagittal slices but the slice axis is set to axial"
    ):
        fake_logic.propagate(ct.volume, seg, [LEFT_LUNG], axis="axial")
    result = fake_logic.propagate(ct.volume, seg, [LEFT_LUNG], axis="sagittal")
    assert result.axis == 2 and result.orientation == "sagittal"


def test_error_nan_voxels(mrml, ct, fake_logic):
    node = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "WithNaN")
    array = slicer.util.arrayFromVolume(ct.volume).astype(np.float32)
    array.flat[::997] = np.nan
    array.flat[5] = np.inf
    bad = int((~np.isfinite(array)).sum())
    slicer.util.updateVolumeFromArray(node, array)
    m = vtk.vtkMatrix4x4()
    ct.volume.GetIJKToRASMatrix(m)
    node.SetIJKToRASMatrix(m)
    seg = painted_segmentation(mrml, ct, "NaN")
    before = masks(seg, ct.volume)
    with pytest.raises(OFLSAM2UserError, match=f"has {bad} of {array.size} voxels that are not a"):
        fake_logic.propagate(node, seg, [RIGHT_LUNG])
    for sid in ALL_SEGMENTS:
        np.testing.assert_array_equal(masks(seg, ct.volume)[sid], before[sid], err_msg=sid)


def test_error_one_segment_painted_on_two_orientations(mrml, ct, fake_logic):
    seg = load_segmentation(mrml.scene, "TwoOrientations")
    truth = ct.truth[RIGHT_LUNG]
    sparse = keep_slices(truth, ct.painted)
    sagittal = painted_slices(truth, axis=2)[1]
    sparse[:, :, sagittal] |= truth[:, :, sagittal]  # one stroke in the sagittal view
    slicer.util.updateSegmentBinaryLabelmapFromArray(sparse, seg, RIGHT_LUNG, ct.volume)
    with pytest.raises(OFLSAM2UserError, match="painted on both axial and sagittal slices"):
        fake_logic.propagate(ct.volume, seg, [RIGHT_LUNG])
    assert not fake_logic.made  # refused before the engine


def test_error_engine_messages_pass_through(mrml, ct):
    def missing(settings):
        raise WeightsError(
            "weights for sam2.1_hiera_tiny are missing: run `oflsam2 weights download ...`"
        )

    seg = painted_segmentation(mrml, ct, "Errors5")
    before = masks(seg, ct.volume)
    with pytest.raises(OFLSAM2UserError, match="^weights for sam2.1_hiera_tiny are missing"):
        OFLSAM2Logic(missing).propagate(ct.volume, seg, [RIGHT_LUNG])
    for sid in ALL_SEGMENTS:
        np.testing.assert_array_equal(masks(seg, ct.volume)[sid], before[sid])


def test_options_from_panel_choices():
    options = PropagationOptions.fromChoices(
        Model.SAM21_SMALL, Quality.FAST, sliceAxis=SliceAxis.CORONAL, fitSteps=0, sliceRange=(3, 9)
    )
    settings = options.settings
    assert (settings.backbone, settings.model, settings.image_size) == (
        "sam2",
        "sam2.1_hiera_small",
        512,
    )
    assert (options.axis, options.slice_range, settings.fit_steps) == ("coronal", (3, 9), None)
    assert PropagationOptions.fromChoices(Model.LITEMEDSAM).settings.backbone == "litemedsam"
    assert {m.label() for m in Model} >= {"SAM2.1 tiny", "LiteMedSAM (offline)"}
    # the panel's defaults are the engine's
    assert PropagationOptions.fromChoices().settings == DEFAULTS
    assert PropagationOptions().settings == DEFAULTS
    assert Model.default().applyTo(DEFAULTS) == DEFAULTS
    assert (Quality.default().value, Device.default().value) == (
        DEFAULTS.image_size,
        DEFAULTS.device,
    )
    # what needs a new segmenter: the engine's key (LiteMedSAM ignores SAM2's model and size)
    lite = PropagationOptions.fromChoices(Model.LITEMEDSAM, Quality.FAST).settings
    assert lite.engine_key() == DEFAULTS.engine_key()
    assert options.settings.engine_key() != DEFAULTS.engine_key()
    assert PropagationOptions.build(gamma=0.8, axis=2).settings == DEFAULTS.replace(gamma=0.8)


def test_bad_settings_are_user_errors(mrml, ct, fake_logic):
    seg = painted_segmentation(mrml, ct, "BadSettings")
    with pytest.raises(OFLSAM2UserError, match="gamma"):
        fake_logic.propagate(ct.volume, seg, [RIGHT_LUNG], gamma=1.5)


# ---------------------------------------------------------------- export, scene life cycle


@pytest.mark.parametrize("suffix", [".seg.nrrd", ".nii.gz"])
def test_export_on_the_volume_grid(mrml, ct, fake_logic, tmp_path, suffix, sample_ct):
    seg = load_segmentation(mrml.scene, f"Export{suffix}")
    nodes = node_ids(mrml.scene)
    path = fake_logic.exportSegments(
        seg, [RIGHT_LUNG, LEFT_LUNG], ct.volume, str(tmp_path / f"out{suffix}")
    )
    reference = sample_ct.geometry
    labels = read_labels(path, reference)
    assert labels.geometry.differences(reference) == []
    np.testing.assert_array_equal(labels.array == 1, ct.truth[RIGHT_LUNG] > 0)
    np.testing.assert_array_equal(labels.array == 2, ct.truth[LEFT_LUNG] > 0)
    assert set(np.unique(labels.array)) == {0, 1, 2}
    # no node left behind: label map or segmentation, display, storage, "<name>_ColorTable"
    assert node_ids(mrml.scene) == nodes
    assert not [n for n in node_names(mrml.scene) if n.endswith("_ColorTable")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"out{suffix}"]  # no temporary file


def node_names(scene) -> list[str]:
    return [scene.GetNthNode(i).GetName() or "" for i in range(scene.GetNumberOfNodes())]


def node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def test_export_rejects_unknown_format(mrml, ct, fake_logic, tmp_path):
    seg = load_segmentation(mrml.scene, "ExportBad")
    with pytest.raises(OFLSAM2UserError, match="format"):
        fake_logic.exportSegments(seg, [RIGHT_LUNG], ct.volume, str(tmp_path / "out.png"))
    with pytest.raises(OFLSAM2UserError, match="format"):  # a detached header: two files
        fake_logic.exportSegments(seg, [RIGHT_LUNG], ct.volume, str(tmp_path / "out.nhdr"))


class FailingStorage(slicer.vtkMRMLVolumeArchetypeStorageNode):
    """Writes part of a file, then fails (a full disk, a lost network share)."""

    def WriteData(self, node):
        Path(self.GetFileName()).write_bytes(b"half a file")
        return 0


def test_failed_export_leaves_no_half_written_file(mrml, ct, fake_logic, tmp_path, monkeypatch):
    seg = load_segmentation(mrml.scene, "ExportFails")
    nodes = node_ids(mrml.scene)
    original = mrmlio._labelmapCopy

    def failing(*args):
        node, _ = original(*args)
        return node, FailingStorage()

    monkeypatch.setattr(mrmlio, "_labelmapCopy", failing)
    previous = tmp_path / "previous.nii.gz"
    previous.write_bytes(b"the previous export")
    with pytest.raises(OFLSAM2UserError, match="Could not write .*previous.nii.gz"):
        fake_logic.exportSegments(seg, [RIGHT_LUNG], ct.volume, str(previous))
    assert previous.read_bytes() == b"the previous export"  # replaced only on success
    with pytest.raises(OFLSAM2UserError, match="Could not write"):
        fake_logic.exportSegments(seg, [RIGHT_LUNG], ct.volume, str(tmp_path / "new.nii.gz"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous.nii.gz"]
    assert node_ids(mrml.scene) == nodes
    monkeypatch.undo()
    folder = tmp_path / "taken.nii.gz"
    folder.mkdir()  # a folder where the file should go: one line, not a traceback
    with pytest.raises(OFLSAM2UserError, match="Could not write"):
        fake_logic.exportSegments(seg, [RIGHT_LUNG], ct.volume, str(folder))
    assert folder.is_dir() and not list(folder.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous.nii.gz", "taken.nii.gz"]
    assert node_ids(mrml.scene) == nodes


def test_segmenter_dropped_with_its_volume(mrml, ct, fake_logic):
    volume = load_volume(mrml.scene, CT_PATH, "Temporary")
    seg = painted_segmentation(mrml, ct, "Dropped")
    fake_logic.propagate(volume, seg, [RIGHT_LUNG])
    store = fake_logic.store
    assert volume.GetID() in store.sessions
    vid = volume.GetID()
    mrml.scene.RemoveNode(volume)
    assert vid not in store.sessions
    assert not any(k[2] == vid for k in store.written)
    fake_logic.propagate(ct.volume, seg, [RIGHT_LUNG])
    assert store.sessions and store.written
    mrml.scene.InvokeEvent(mrml.scene.EndCloseEvent)  # what closing the scene sends
    assert not store.sessions and not store.written and not store.histories


def test_cleanup_removes_the_stores_scene_observers():
    scene = slicer.vtkMRMLScene()
    events = (scene.NodeRemovedEvent, scene.StartCloseEvent, scene.EndCloseEvent)
    assert not any(scene.HasObserver(e) for e in events)
    logic = OFLSAM2Logic(FakeSegmenter)
    logic.store.watch(scene)
    assert all(scene.HasObserver(e) for e in events)
    logic.cleanup()  # what the module's cleanup() calls
    assert not any(scene.HasObserver(e) for e in events)


def test_each_logic_owns_its_store_and_cleanup_stops_observing(mrml, ct, fake_logic):
    seg = painted_segmentation(mrml, ct, "Owned")
    fake_logic.propagate(ct.volume, seg, [RIGHT_LUNG])
    other = OFLSAM2Logic(FakeSegmenter)
    assert not other.store.sessions and not other.canUndo(seg)
    store = fake_logic.store
    assert store.watching and store.sessions
    fake_logic.cleanup()
    assert not store.watching and not store.sessions and not store.written
    store.sessions["sentinel"] = None
    mrml.scene.InvokeEvent(mrml.scene.EndCloseEvent)
    assert "sentinel" in store.sessions  # its observers are gone


# ---------------------------------------------------------------- the real engine

# These tests are about the Slicer glue, so the engine runs lean: 10 training steps and no
# online learning give Dice 0.91 here in about a minute (online learning costs ~2 more minutes
# on 2 CPU cores); the SAM2 test below keeps online learning on to cover that path.
ENGINE_OPTIONS = {"device": "cpu", "seed": 0, "fit_steps": 10, "online": False}


@pytest.fixture(scope="module")
def engine():
    return pytest.importorskip("oflsam2.segmenter")


@pytest.fixture(scope="module")
def litemedsam_run(mrml, ct, engine):
    """One LiteMedSAM propagation of the right lung from three painted slices, shared by checks."""
    seg = painted_segmentation(mrml, ct, "LiteMedSAM")
    before = masks(seg, ct.volume)
    logic = OFLSAM2Logic()
    t0 = time.perf_counter()
    result = logic.propagate(ct.volume, seg, [RIGHT_LUNG], backbone="litemedsam", **ENGINE_OPTIONS)
    seconds = time.perf_counter() - t0
    return types.SimpleNamespace(
        logic=logic,
        seg=seg,
        before=before,
        after=masks(seg, ct.volume),
        result=result,
        seconds=seconds,
    )


@pytest.mark.slow
@pytest.mark.engine
def test_litemedsam_quality_on_unpainted_slices(ct, litemedsam_run):
    truth = ct.truth[RIGHT_LUNG]
    got = litemedsam_run.after[RIGHT_LUNG]
    unpainted = [t for t in range(truth.shape[0]) if t not in ct.painted]
    score = dice(got[unpainted], truth[unpainted])
    print(
        f"LiteMedSAM right lung, 3 painted slices: Dice {score:.3f} in {litemedsam_run.seconds:.1f} s"
    )
    assert score >= RIGHT_LUNG_LITEMEDSAM_FLOOR


@pytest.mark.slow
@pytest.mark.engine
def test_litemedsam_keeps_paint_and_other_segments(ct, litemedsam_run):
    run = litemedsam_run
    for sid in ALL_SEGMENTS:
        if sid != RIGHT_LUNG:
            np.testing.assert_array_equal(run.after[sid], run.before[sid], err_msg=sid)
    for t in ct.painted:
        np.testing.assert_array_equal(run.after[RIGHT_LUNG][t], run.before[RIGHT_LUNG][t])
    assert run.result.slicesWritten[RIGHT_LUNG] > 0
    assert run.result.encoderCalls >= run.result.encodedSlices > 0


@pytest.mark.slow
@pytest.mark.engine
def test_litemedsam_suggests_the_next_slice_and_shows_its_confidence(ct, litemedsam_run):
    result = litemedsam_run.result
    nxt = result.nextSlice
    assert nxt is not None and nxt.orientation == "axial"
    assert nxt.index not in ct.painted and 0 < nxt.score <= 1
    assert ct.truth[RIGHT_LUNG][nxt.index].any()  # a slice through the lung
    conf = result.sliceConfidence
    predicted = [t for t in range(34) if np.isfinite(conf.values[t])]
    assert len(predicted) > 10 and not set(predicted) & set(ct.painted)
    assert all(0 <= conf.values[t] <= 1 for t in predicted)
    print(f"{nxt.text()} ({nxt.score:.0%}); confidence {conf.bar()}; {conf.summary()}")


@pytest.mark.slow
@pytest.mark.engine
def test_repropagation_encodes_no_slice_twice(mrml, ct, litemedsam_run):
    run = litemedsam_run
    first = run.result.encoderCalls
    propagated = masks(run.seg, ct.volume, [RIGHT_LUNG])[RIGHT_LUNG]
    fourth = (ct.painted[0] + ct.painted[1]) // 2
    corrected = propagated.copy()
    corrected[fourth] = ct.truth[RIGHT_LUNG][fourth]
    slicer.util.updateSegmentBinaryLabelmapFromArray(corrected, run.seg, RIGHT_LUNG, ct.volume)
    result = run.logic.propagate(  # the same logic: its session keeps the encoded slices
        ct.volume, run.seg, [RIGHT_LUNG], backbone="litemedsam", **ENGINE_OPTIONS
    )
    print(f"re-propagation: encoder calls {first} -> {result.encoderCalls}, {result.seconds:.1f} s")
    assert result.annotatedSlices[RIGHT_LUNG] == sorted(ct.painted + [fourth])
    assert (
        result.encoderCalls <= ct.volume.GetImageData().GetDimensions()[2]
    )  # no slice encoded twice
    after = masks(run.seg, ct.volume, [RIGHT_LUNG])[RIGHT_LUNG]
    np.testing.assert_array_equal(after[fourth], ct.truth[RIGHT_LUNG][fourth])


@pytest.mark.slow
@pytest.mark.engine
def test_engine_cancel_leaves_segmentation_unchanged(mrml, ct, engine):
    seg = painted_segmentation(mrml, ct, "EngineCancel")
    before = masks(seg, ct.volume)
    logic = OFLSAM2Logic()
    job = logic.startPropagation(
        ct.volume, seg, [RIGHT_LUNG], PropagationOptions.build(**ENGINE_OPTIONS)
    )
    job.cancel()
    assert job.wait(120).state == "cancelled"
    with pytest.raises(PropagationCancelled):
        logic.finishPropagation(job)
    after = masks(seg, ct.volume)
    for sid in ALL_SEGMENTS:
        np.testing.assert_array_equal(after[sid], before[sid], err_msg=sid)


@pytest.mark.slow
@pytest.mark.engine
def test_oblique_volume_gives_the_same_result(mrml, ct, engine):
    """Same voxels, rotated IJK-to-RAS: the same labels on each volume's own grid (real engine)."""
    span = (ct.painted[0], ct.painted[0] + 4)  # a short slice range keeps the two runs quick
    straight = painted_segmentation(mrml, ct, "StraightRange")
    node, oblique = oblique_copy(mrml, ct, "Oblique", ct.painted)
    # seed 1: a fresh segmenter for each volume (RNG state included), so the runs can match exactly
    options = dict(ENGINE_OPTIONS, slice_range=span, seed=1)
    a = OFLSAM2Logic().propagate(
        ct.volume, straight, [RIGHT_LUNG], backbone="litemedsam", **options
    )
    b = OFLSAM2Logic().propagate(node, oblique, [RIGHT_LUNG], backbone="litemedsam", **options)
    got_a, got_b = masks(straight, ct.volume), masks(oblique, node)
    for sid in ALL_SEGMENTS:
        if sid != RIGHT_LUNG:
            np.testing.assert_array_equal(got_b[sid], got_a[sid], err_msg=sid)
    score = dice(got_b[RIGHT_LUNG], got_a[RIGHT_LUNG])
    same = np.array_equal(got_b[RIGHT_LUNG], got_a[RIGHT_LUNG])
    print(
        f"oblique vs straight: Dice {score:.4f}, identical {same}, {a.orientation} vs {b.orientation}"
    )
    assert a.slicesWritten[RIGHT_LUNG] > 0
    assert same, f"oblique and straight results differ (Dice {score:.4f})"


@pytest.mark.slow
@pytest.mark.engine
def test_sam2_random_weights_mechanics(mrml, ct, engine):
    seg = painted_segmentation(mrml, ct, "SAM2")
    before = masks(seg, ct.volume)
    span = (ct.painted[0], ct.painted[0] + 4)
    options = dict(ENGINE_OPTIONS, fit_steps=5, online=True, slice_range=span)
    result = OFLSAM2Logic().propagate(
        ct.volume, seg, [RIGHT_LUNG], backbone="sam2", random_init=True, image_size=512, **options
    )
    after = masks(seg, ct.volume)
    for sid in ALL_SEGMENTS:
        if sid != RIGHT_LUNG:
            np.testing.assert_array_equal(after[sid], before[sid], err_msg=sid)
    for t in ct.painted:
        np.testing.assert_array_equal(after[RIGHT_LUNG][t], before[RIGHT_LUNG][t])
    assert result.backbone == "sam2" and result.encoderCalls > 0
