"""Save learner… and Apply learner… through the logic, on a real slicer-core MRML scene."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

import test_slicer_logic  # noqa: E402
from learner_data import PROMPT_FREE_FLOOR, folder, learner_path, volume  # noqa: E402
from test_slicer_logic import load_volume  # noqa: E402

from oflsam2 import learner_file  # noqa: E402
from oflsam2.metrics import dice  # noqa: E402
from oflsam2_slicer import OFLSAM2Logic, OFLSAM2UserError  # noqa: E402


@pytest.fixture(scope="module")
def scene():
    """The MRML scene of test_slicer_logic (slicer.mrmlScene and the modules' logics)."""
    yield from test_slicer_logic.mrml.__wrapped__()


def segment_ids(node) -> list[str]:
    seg = node.GetSegmentation()
    return [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]


def labelled_liver(scene, name: str):
    """Volume ``a`` and a segmentation whose segment "liver" holds its whole label."""
    node = load_volume(scene.scene, folder() / "a.nrrd", name)
    segmentation = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"S{name}")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(node)
    sid = segmentation.GetSegmentation().AddEmptySegment("", "liver", [0.8, 0.4, 0.2])
    _, truth = volume("a")
    slicer.util.updateSegmentBinaryLabelmapFromArray(truth, segmentation, sid, node)
    return node, segmentation, sid


@pytest.mark.slow
@pytest.mark.engine
def test_apply_learner_writes_named_segments_undoably(scene):
    node = load_volume(scene.scene, folder() / "b.nrrd", "B")
    segmentation = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "S")
    segmentation.CreateDefaultDisplayNodes()
    other = segmentation.GetSegmentation().AddEmptySegment("", "kept", [0.1, 0.2, 0.3])
    logic = OFLSAM2Logic()
    result = logic.applyLearner(node, segmentation, str(learner_path()))
    ids = segment_ids(segmentation)
    assert len(ids) == 2 and other in ids
    (sid,) = result.segmentIds
    assert segmentation.GetSegmentation().GetSegment(sid).GetName() == "right lung"
    color = segmentation.GetSegmentation().GetSegment(sid).GetColor()
    np.testing.assert_allclose(color, (0.5, 0.7, 0.9), atol=1e-6)
    assert list(result.seeds) == [sid] and result.missing == []
    _, truth = volume("b")
    mask = OFLSAM2Logic.segmentMask(segmentation, sid, node)
    assert dice(mask > 0, truth > 0) >= PROMPT_FREE_FLOOR
    assert result.slicesWritten[sid] == truth.shape[0]
    assert not OFLSAM2Logic.segmentMask(segmentation, other, node).any()
    assert logic.canUndo(segmentation) and logic.undo(segmentation)
    assert not OFLSAM2Logic.segmentMask(segmentation, sid, node).any()


@pytest.mark.slow
@pytest.mark.engine
def test_save_learner_trains_on_the_segments_as_they_are(scene, tmp_path):
    node, segmentation, sid = labelled_liver(scene, "A")
    path = tmp_path / "liver.oflsam2"
    logic = OFLSAM2Logic()
    assert logic.saveLearner(node, segmentation, str(path), [sid], fit_steps=3) == str(path)
    lf = learner_file.load(path)
    assert lf.names == {1: "liver"} and lf.meta["backbone"] == "litemedsam"
    np.testing.assert_allclose(lf.colors[1], (0.8, 0.4, 0.2), atol=1e-6)
    assert lf.meta["training"]["segments"]["1"]["steps"] == 3


def test_bad_learner_files_are_one_line_user_errors(scene, tmp_path):
    node = load_volume(scene.scene, folder() / "a.nrrd", "A2")
    segmentation = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "S2")
    logic = OFLSAM2Logic()
    evil = tmp_path / "evil.oflsam2"
    evil.write_bytes(b"\x80\x04K\x01.")
    for path, message in ((evil, "pickle"), (tmp_path / "none", "does not exist")):
        with pytest.raises(OFLSAM2UserError, match=message) as info:
            logic.applyLearner(node, segmentation, str(path))
        assert "\n" not in str(info.value)
    with pytest.raises(OFLSAM2UserError, match="No input volume"):
        logic.applyLearner(None, segmentation, str(evil))
    assert segment_ids(segmentation) == []


@pytest.mark.slow
@pytest.mark.engine
def test_apply_learner_runs_in_the_background_and_a_cancel_writes_nothing(scene):
    """The GUI thread is free while a learner job runs; nothing else may start; cancelled, no
    segment is added or changed."""
    import threading

    from oflsam2.segmenter import OFLSegmenter
    from oflsam2_slicer import TaskCancelled

    node = load_volume(scene.scene, folder() / "b.nrrd", "B3")
    segmentation = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "S3")
    segmentation.CreateDefaultDisplayNodes()
    gate = threading.Event()

    def gated(settings):
        assert gate.wait(60), "the test never opened the gate"
        return OFLSegmenter(settings)

    logic = OFLSAM2Logic(gated)
    job = logic.startApplyLearner(node, segmentation, str(learner_path()))
    assert job.poll().state == "running"  # waiting at the gate, on its own thread
    with pytest.raises(OFLSAM2UserError, match="A learner task is already running"):
        logic.startApplyLearner(node, segmentation, str(learner_path()))
    with pytest.raises(OFLSAM2UserError, match="A learner task is already running"):
        logic.startPropagation(node, segmentation, [])
    job.cancel()
    gate.set()
    assert job.wait(120).finished
    with pytest.raises(TaskCancelled, match="nothing was written"):
        logic.finishApplyLearner(job)
    assert segment_ids(segmentation) == []
    assert logic.store.active is None
    assert not logic.canUndo(segmentation)


@pytest.mark.engine
def test_a_cancelled_save_learner_writes_no_file(scene, tmp_path):
    from oflsam2_slicer import TaskCancelled

    node, segmentation, sid = labelled_liver(scene, "A4")
    path = tmp_path / "liver.oflsam2"
    logic = OFLSAM2Logic()
    job = logic.startSaveLearner(node, segmentation, str(path), [sid], fit_steps=3)
    job.cancel()
    assert job.wait(300).finished
    with pytest.raises(TaskCancelled, match="nothing was written"):
        logic.finishSaveLearner(job)
    assert not path.exists() and not list(tmp_path.iterdir())
