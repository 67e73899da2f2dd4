"""One propagation: what was read on the main thread, the engine run in the background, the result."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from oflsam2.progress import Progress, ProgressEvent
from oflsam2.settings import Settings
from oflsam2.volume import Geometry

from .options import PropagationOptions
from .planning import Group, Layout, slicesChanged
from .review import NextSlice, SliceConfidence, nextSlice, sliceConfidence
from .store import Session
from .task import LOADING, PROPAGATION, BackgroundTask, Job

SegmenterFactory = Callable[[Settings], Any]


@dataclass(frozen=True)
class Plan:
    """Everything a propagation needs, read from the scene on the main thread."""

    volumeNode: Any  # vtkMRMLScalarVolumeNode
    segmentationNode: Any  # vtkMRMLSegmentationNode
    names: dict[str, str]  # chosen segment ID -> segment name, in the order chosen
    layout: Layout
    groups: list[Group]
    originals: dict[str, np.ndarray]  # segment -> uint8 mask on the full volume grid, at start
    array: np.ndarray  # the voxels of the slice window (a view of the session's copy)
    geometry: Geometry  # the grid of ``array``
    session: Session
    options: PropagationOptions
    factory: SegmenterFactory

    @property
    def segmentIds(self) -> list[str]:
        return list(self.names)

    @property
    def labelNames(self) -> dict[int, str]:
        """Label value in the engine's arrays -> segment name."""
        return {
            value: self.names[sid]
            for group in self.groups
            for sid, value in zip(group.segmentIds, group.values, strict=True)
        }


@dataclass(frozen=True)
class PropagationResult:
    """What one propagation did, for the status line, scripts and tests."""

    segmentIds: list[str]
    axis: int  # array axis (0 = k, 1 = j, 2 = i) of the slices
    orientation: str  # axial, coronal or sagittal (closest anatomical name of that axis)
    annotatedSlices: dict[str, list[int]]  # segment -> slices taken as the user's annotation
    slicesWritten: dict[str, int]  # segment -> slices whose content changed
    encodedSlices: int  # slices the encoder ran on in this propagation (cache misses)
    encoderCalls: int  # slices encoded by this volume's segmenter so far
    timings: dict[str, float]  # stage -> seconds (engine stages plus "total")
    seconds: float  # wall time from start to written result
    backbone: str = ""
    weights: str = ""
    nextSlice: NextSlice | None = None  # where to paint next (None: nothing to suggest)
    sliceConfidence: SliceConfidence | None = None  # the engine's confidence per slice


def _engineTotals(results: Sequence[Any]) -> tuple[dict[str, float], int]:
    """Seconds per stage and slices encoded, summed over the engine's results."""
    timings: dict[str, float] = {}
    encoded = 0
    for result in results:
        for stage, seconds in (getattr(result, "timings", None) or {}).items():
            timings[stage] = timings.get(stage, 0.0) + float(seconds)
        encoded += int(getattr(result, "encoded_slices", 0) or 0)
    return timings, encoded


class PropagationJob(Job):
    """A propagation running in the background: ``poll()``, ``cancel()``, then the logic writes it.

    Created by :meth:`OFLSAM2Logic.startPropagation`; hand it to
    :meth:`OFLSAM2Logic.finishPropagation` on the main thread once ``poll().finished``.
    """

    def __init__(self, plan: Plan) -> None:
        super().__init__(BackgroundTask(self._run, kind=PROPAGATION, names=plan.labelNames), plan)
        self.engineResults: list[Any] = []
        self.startTime = time.perf_counter()

    def _run(self, progress: Progress, cancel: threading.Event) -> list[Any]:
        plan = self.plan
        if plan.session.segmenter is None:
            progress(ProgressEvent(LOADING, None, 0, 0))
            plan.session.segmenter = plan.factory(plan.options.settings)
        segmenter = plan.session.segmenter
        results = []
        for group in plan.groups:
            segmenter.set_volume(plan.array, plan.geometry)
            segmenter.fit(
                group.sparse,
                slices=group.slices,
                axis=plan.layout.axis,
                progress=progress,
                cancel=cancel,
            )
            results.append(segmenter.propagate(progress=progress, cancel=cancel))
        self.engineResults = results
        return results

    def result(self, written: Mapping[str, np.ndarray]) -> PropagationResult:
        """The summary of this job once ``written`` (segment -> full-grid mask) was written."""
        plan, layout = self.plan, self.plan.layout
        timings, encoded = _engineTotals(self.engineResults)
        seconds = time.perf_counter() - self.startTime
        timings["total"] = seconds
        segmenter = plan.session.segmenter
        backbone = getattr(segmenter, "backbone", None)
        return PropagationResult(
            segmentIds=plan.segmentIds,
            axis=layout.axis,
            orientation=layout.orientation,
            annotatedSlices={sid: list(layout.annotated[sid]) for sid in plan.names},
            slicesWritten={
                sid: slicesChanged(written[sid], plan.originals[sid], layout.axis)
                for sid in plan.names
            },
            encodedSlices=encoded,
            encoderCalls=int(getattr(segmenter, "encoder_calls", 0) or 0),
            timings=timings,
            seconds=seconds,
            backbone=str(getattr(backbone, "name", plan.options.settings.backbone)),
            weights=str(getattr(backbone, "weights", "") or ""),
            nextSlice=nextSlice(plan, self.engineResults),
            sliceConfidence=sliceConfidence(plan, self.engineResults),
        )
