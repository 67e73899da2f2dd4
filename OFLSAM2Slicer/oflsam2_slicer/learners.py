"""Save learner… and Apply learner…: reuse what was learned on one volume for the next.

Saving trains a learner file (:mod:`oflsam2.transfer`) on the volume's segments as they are
now (propagated and corrected), so what is saved is what the user accepted. Applying segments
the current volume with a learner file: with nothing painted it finds the structure itself;
segments the user did paint are the anchors. The result is written like a propagation's:
only the learner's segments (found or made by name), undoably.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import slicer

from oflsam2.progress import Progress
from oflsam2.settings import DEFAULTS, Settings

from . import mrmlio
from .errors import OFLSAM2UserError, userErrors

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


def saveLearner(
    volumeNode: slicer.vtkMRMLScalarVolumeNode | None,
    segmentationNode: slicer.vtkMRMLSegmentationNode | None,
    segmentIds: list[str] | None,
    path: str,
    settings: Settings = DEFAULTS,
    progress: Progress | None = None,
) -> str:
    """Train a learner on the chosen segments of ``volumeNode`` and write it to ``path``
    (``settings.fit_steps``: training steps, None for the engine's default)."""
    from oflsam2 import learner_file
    from oflsam2.segmenter import OFLSegmenter
    from oflsam2.transfer import LabelledVolume, train_learner

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
    with userErrors():
        lf = train_learner(
            [LabelledVolume(volumeNode.GetName(), array, labels, geometry, None)],
            settings,
            {v: names[sid] for v, sid in values.items()},
            {v: _segmentColor(segmentation, sid) for v, sid in values.items()},
            steps=settings.fit_steps,
            progress=progress,
            segmenter=OFLSegmenter(settings.replace(roi="none")),
        )
        learner_file.save(lf, Path(path))
    return str(path)


def _segmentsFor(segmentationNode, lf) -> dict[int, str]:
    """Label value -> segment ID: the segment of that name, or a new one with the file's colour."""
    segmentation = segmentationNode.GetSegmentation()
    byName = {}
    for i in range(segmentation.GetNumberOfSegments()):
        sid = segmentation.GetNthSegmentID(i)
        byName.setdefault(segmentation.GetSegment(sid).GetName(), sid)
    out = {}
    colors = lf.colors
    for value, name in lf.names.items():
        sid = byName.get(name)
        if sid is None:
            sid = segmentation.AddEmptySegment("", name, list(colors.get(value, (0.9, 0.6, 0.2))))
        out[value] = sid
    return out


def applyLearner(
    volumeNode: slicer.vtkMRMLScalarVolumeNode | None,
    segmentationNode: slicer.vtkMRMLSegmentationNode | None,
    path: str,
    history: slicer.vtkSegmentationHistory | Callable[[], Any],
    settings: Settings = DEFAULTS,
    progress: Progress | None = None,
    beforeWrite: Callable[[], None] | None = None,
    segmenter: Any = None,
) -> AppliedLearner:
    """Segment ``volumeNode`` with the learner file at ``path`` and write its segments undoably.

    ``history`` is the segmentation's undo history (or a callable giving it once needed).
    """
    from oflsam2 import learner_file
    from oflsam2.segmenter import OFLSegmenter
    from oflsam2.transfer import apply_learner, check_modality, settings_for

    mrmlio.requireInputs(volumeNode, segmentationNode)
    with userErrors():
        lf = learner_file.load(path)
    array, geometry = mrmlio.volumeInput(volumeNode)
    with userErrors():
        check_modality(lf, array, None, f"Volume '{volumeNode.GetName()}'")
    ids = _segmentsFor(segmentationNode, lf)
    before = {v: mrmlio.segmentMask(segmentationNode, sid, volumeNode) for v, sid in ids.items()}
    painted = np.zeros(array.shape, np.uint8)
    for value, mask in before.items():
        painted[(mask > 0) & (painted == 0)] = value
    with userErrors():
        seg = segmenter or OFLSegmenter(settings_for(lf, settings))
        applied = apply_learner(
            seg, lf, array, geometry, None, painted if painted.any() else None, progress=progress
        )
    labels = np.asarray(applied.result.labels)
    changed = {}
    for value, sid in ids.items():
        mask = (labels == value).astype(np.uint8)
        if not np.array_equal(mask, before[value]):
            changed[sid] = mask
    if changed:
        undo = history() if callable(history) else history
        mrmlio.writeSegments(segmentationNode, volumeNode, changed, undo, beforeWrite)
    axis = applied.result.axis
    return AppliedLearner(
        segmentIds=[ids[v] for v in sorted(ids)],
        seeds={ids[v]: t for v, t in applied.seeds.items()},
        missing=[ids[v] for v in applied.missing],
        slicesWritten={
            sid: int(np.any(mask != before[v], axis=tuple(a for a in range(3) if a != axis)).sum())
            for v, sid in ids.items()
            for mask in [(labels == v).astype(np.uint8)]
        },
    )
