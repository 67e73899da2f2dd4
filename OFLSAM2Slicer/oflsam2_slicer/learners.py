"""Save learner… and Apply learner…: reuse what was learned on one volume for the next.

Saving trains a learner file (:mod:`oflsam2.transfer`) on the volume's segments as they are
now (propagated and corrected), so what is saved is what the user accepted. Applying segments
the current volume with a learner file: with nothing painted it finds the structure itself;
segments the user did paint are the anchors. The result is written like a propagation's:
only the learner's segments (found or made by name), undoably.

Both run like a propagation: the scene is read on the main thread, the engine works on a
background thread (:class:`LearnerJob`, waited for with the GUI alive), and only then is
anything written (the file, or the segments, on the main thread).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import slicer

from oflsam2.progress import Progress, ProgressEvent
from oflsam2.settings import DEFAULTS, Settings

from . import mrmlio
from .errors import OFLSAM2UserError, userErrors
from .task import LOADING, BackgroundTask, Job

LEARNER_FILTER = "OFL-SAM2 learner (*.oflsam2);;All files (*)"


@dataclass(frozen=True)
class AppliedLearner:
    """What Apply learner… did, for the status line and tests."""

    segmentIds: list[str]  # the learner's segments in the segmentation, in value order
    seeds: dict[str, int]  # segment -> slice it was seeded on (nothing painted)
    missing: list[str]  # segments the learner did not find in this volume
    slicesWritten: dict[str, int]  # segment -> slices whose content changed


def _segmentColor(segmentation, sid: str) -> tuple[float, float, float]:
    return tuple(float(c) for c in segmentation.GetSegment(sid).GetColor())


class LearnerJob(Job):
    """Save learner… or Apply learner… in the background; its result is the task's."""

    def __init__(
        self,
        work: Callable[[Progress, threading.Event], Any],
        plan: Any = None,
        names: dict[int, str] | None = None,
    ) -> None:
        super().__init__(BackgroundTask(work, names=names), plan)

    @property
    def result(self) -> Any:
        return self.task.result


def _importEngine() -> None:
    """Import torch and the engine on the main thread (never first in a worker thread)."""
    with userErrors():
        import oflsam2.segmenter  # noqa: F401
        import oflsam2.transfer  # noqa: F401


def _engine(factory: Callable[[Settings], Any], settings: Settings, progress: Progress) -> Any:
    """The segmenter, built with "loading model" on the status line; a Cancel pressed meanwhile
    stops the job before any slice is encoded (progress raises once cancelled)."""
    progress(ProgressEvent(LOADING, None, 0, 0))
    seg = factory(settings)
    progress(ProgressEvent(LOADING, None, 1, 1))
    return seg


def startSave(
    volumeNode: slicer.vtkMRMLScalarVolumeNode | None,
    segmentationNode: slicer.vtkMRMLSegmentationNode | None,
    segmentIds: list[str] | None,
    path: str,
    settings: Settings = DEFAULTS,
    factory: Callable[[Settings], Any] | None = None,
) -> LearnerJob:
    """Read the chosen segments of ``volumeNode`` now; train a learner on them and write it to
    ``path`` in the background (``settings.fit_steps``: training steps, None for the default).
    ``factory`` builds the engine (default ``OFLSegmenter``). The job's result is the path."""
    mrmlio.requireInputs(volumeNode, segmentationNode)
    if not path:
        raise OFLSAM2UserError("No file name: choose where to save the learner")
    array, geometry = mrmlio.volumeInput(volumeNode)
    names = mrmlio.segmentNames(segmentationNode, segmentIds)
    masks = mrmlio.paintedMasks(segmentationNode, names, volumeNode, array.shape)
    labels = np.zeros(array.shape, np.uint8)
    values = {}
    for value, sid in enumerate(names, start=1):
        labels[(masks[sid] > 0) & (labels == 0)] = value
        values[value] = sid
    segmentation = segmentationNode.GetSegmentation()
    colors = {v: _segmentColor(segmentation, sid) for v, sid in values.items()}
    labelNames = {v: names[sid] for v, sid in values.items()}
    volumeName = volumeNode.GetName()
    _importEngine()

    def work(progress: Progress, cancel: threading.Event) -> str:
        from oflsam2 import learner_file
        from oflsam2.errors import Cancelled
        from oflsam2.segmenter import OFLSegmenter
        from oflsam2.transfer import LabelledVolume, train_learner

        with userErrors():
            seg = _engine(factory or OFLSegmenter, settings.replace(roi="none"), progress)
            lf = train_learner(
                [LabelledVolume(volumeName, array, labels, geometry, None)],
                settings,
                labelNames,
                colors,
                steps=settings.fit_steps,
                progress=progress,
                cancel=cancel,
                segmenter=seg,
            )
            if cancel.is_set():  # a half-trained learner is never written
                raise Cancelled("cancelled by the user")
            learner_file.save(lf, Path(path))
        return str(path)

    job = LearnerJob(work, names=labelNames)
    job.start()
    return job


def _segmentsFor(segmentationNode, lf, create: bool) -> dict[int, str | None]:
    """Label value -> the segment of that name; a new one with the file's colour if ``create``
    (else None: made only when the result is written, so a failed run adds nothing)."""
    segmentation = segmentationNode.GetSegmentation()
    byName = {}
    for i in range(segmentation.GetNumberOfSegments()):
        sid = segmentation.GetNthSegmentID(i)
        byName.setdefault(segmentation.GetSegment(sid).GetName(), sid)
    out = {}
    colors = lf.colors
    for value, name in lf.names.items():
        sid = byName.get(name)
        if sid is None and create:
            sid = segmentation.AddEmptySegment("", name, list(colors.get(value, (0.9, 0.6, 0.2))))
        out[value] = sid
    return out


@dataclass
class ApplyPlan:
    """What Apply learner… read from the scene on the main thread."""

    volumeNode: Any
    segmentationNode: Any
    lf: Any  # oflsam2.learner_file.LearnerFile
    segmentIds: dict[int, str | None]  # label value -> existing segment of that name, or None
    before: dict[int, np.ndarray]  # label value -> its mask when read (zeros: no segment yet)


def startApply(
    volumeNode: slicer.vtkMRMLScalarVolumeNode | None,
    segmentationNode: slicer.vtkMRMLSegmentationNode | None,
    path: str,
    settings: Settings = DEFAULTS,
    factory: Callable[[Settings], Any] | None = None,
) -> LearnerJob:
    """Check the learner file at ``path`` against ``volumeNode`` and read its segments now;
    segment the volume in the background (the job's result is an ``oflsam2.transfer.Applied``;
    write it with :func:`writeApplied` on the main thread)."""
    from oflsam2 import learner_file

    mrmlio.requireInputs(volumeNode, segmentationNode)
    with userErrors():
        lf = learner_file.load(path)
    array, geometry = mrmlio.volumeInput(volumeNode)
    _importEngine()
    from oflsam2.segmenter import OFLSegmenter
    from oflsam2.transfer import apply_learner, check_modality, settings_for

    with userErrors():
        check_modality(lf, array, None, f"Volume '{volumeNode.GetName()}'")
    ids = _segmentsFor(segmentationNode, lf, create=False)
    before = {
        v: mrmlio.segmentMask(segmentationNode, sid, volumeNode)
        if sid is not None
        else np.zeros(array.shape, np.uint8)
        for v, sid in ids.items()
    }
    painted = np.zeros(array.shape, np.uint8)
    for value, mask in before.items():
        painted[(mask > 0) & (painted == 0)] = value
    painted = painted if painted.any() else None

    def work(progress: Progress, cancel: threading.Event):
        with userErrors():
            seg = _engine(factory or OFLSegmenter, settings_for(lf, settings), progress)
            return apply_learner(
                seg, lf, array, geometry, None, painted, progress=progress, cancel=cancel
            )

    job = LearnerJob(work, ApplyPlan(volumeNode, segmentationNode, lf, ids, before), lf.names)
    job.start()
    return job


def writeApplied(
    plan: ApplyPlan,
    applied: Any,
    history: slicer.vtkSegmentationHistory | Callable[[], Any],
    beforeWrite: Callable[[], None] | None = None,
) -> AppliedLearner:
    """Write an applied learner's segments undoably (main thread), if nothing changed meanwhile.

    ``history`` is the segmentation's undo history (or a callable giving it once needed).
    """
    segNode, volumeNode = plan.segmentationNode, plan.volumeNode
    existing = {sid: plan.lf.names[v] for v, sid in plan.segmentIds.items() if sid is not None}
    originals = {sid: plan.before[v] for v, sid in plan.segmentIds.items() if sid is not None}
    mrmlio.checkUnchanged(segNode, volumeNode, existing, originals)
    for v, sid in _segmentsFor(segNode, plan.lf, create=False).items():
        added = plan.segmentIds[v] is None and sid is not None  # made by the user meanwhile
        if added and mrmlio.segmentMask(segNode, sid, volumeNode).any():
            raise OFLSAM2UserError(
                f"Segment '{plan.lf.names[v]}' was painted while applying the learner: "
                "nothing was written; apply it again"
            )
    ids = _segmentsFor(segNode, plan.lf, create=True)  # checked first: a refusal adds nothing
    labels = np.asarray(applied.result.labels)
    axis = applied.result.axis
    masks = {v: (labels == v).astype(np.uint8) for v in ids}
    changed = {ids[v]: m for v, m in masks.items() if not np.array_equal(m, plan.before[v])}
    if changed:
        undo = history() if callable(history) else history
        mrmlio.writeSegments(segNode, volumeNode, changed, undo, beforeWrite)
    others = tuple(a for a in range(3) if a != axis)
    return AppliedLearner(
        segmentIds=[ids[v] for v in sorted(ids)],
        seeds={ids[v]: t for v, t in applied.seeds.items()},
        missing=[ids[v] for v in applied.missing],
        slicesWritten={
            ids[v]: int(np.any(m != plan.before[v], axis=others).sum()) for v, m in masks.items()
        },  # fmt: skip
    )
