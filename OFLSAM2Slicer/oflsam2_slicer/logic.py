"""Propagate painted segments of a Slicer segmentation through their volume with OFL-SAM2.

Everything here works on MRML nodes and numpy arrays and never imports Qt, so the module
panel, Slicer's Python console and the tests under ``slicer-core`` share one code path:

1. on the main thread, read the volume (exact IJK-to-RAS geometry) and the chosen segments
   on the volume's grid (:mod:`.mrmlio`), work out which slices the user painted and along
   which axis (:mod:`.planning`);
2. on one background thread (:class:`.task.BackgroundTask`), run the engine (:mod:`.job`),
   while the GUI thread waits in :func:`.task.waitWithEvents` (see :mod:`.task` for why);
3. back on the main thread, write the result into the chosen segments only, undoably,
   keeping every painted slice exactly as the user left it.

The logic instance owns its :class:`.store.Store`: one segmenter per volume node, what each
propagation wrote, and the undo histories; :meth:`OFLSAM2Logic.cleanup` lets go of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import numpy as np
import slicer

from oflsam2.settings import Settings

from . import dependencies, learners, mrmlio, planning
from .errors import OFLSAM2UserError, userErrors
from .job import Plan, PropagationJob, PropagationResult, SegmenterFactory
from .options import PropagationOptions
from .planning import WriteMemory
from .review import NextSlice
from .store import Store
from .task import taskError


def defaultFactory(settings: Settings) -> Any:
    """The engine: ``oflsam2.segmenter.OFLSegmenter(settings)``."""
    from oflsam2.segmenter import OFLSegmenter

    return OFLSegmenter(settings)


class OFLSAM2Logic:
    """Propagate, undo and export segments; usable from the panel, the console and tests.

    ``segmenterFactory`` builds the engine from a :class:`~oflsam2.settings.Settings`
    (tests pass a stand-in); by default it is ``oflsam2.segmenter.OFLSegmenter``.
    """

    def __init__(self, segmenterFactory: SegmenterFactory | None = None) -> None:
        self.segmenterFactory = segmenterFactory or defaultFactory
        self.store = Store()

    def cleanup(self) -> None:
        """Cancel a running propagation, stop observing the scene and drop every session."""
        if self.store.active is not None:
            self.store.active.cancel()
        self.store.unwatch()
        self.store.clear()

    # ------------------------------------------------------------ inputs

    volumeInput = staticmethod(mrmlio.volumeInput)
    defaultSegmentIds = staticmethod(mrmlio.defaultSegmentIds)
    segmentMask = staticmethod(mrmlio.segmentMask)

    # ------------------------------------------------------------ planning (main thread)

    def _plan(
        self,
        volumeNode: slicer.vtkMRMLScalarVolumeNode | None,
        segmentationNode: slicer.vtkMRMLSegmentationNode | None,
        segmentIds: Iterable[str] | None,
        options: PropagationOptions,
    ) -> Plan:
        mrmlio.requireInputs(volumeNode, segmentationNode)
        key = (id(self.segmenterFactory), options.settings.engine_key())
        session = self.store.session(volumeNode, key)
        full, fullGeometry = session.load(volumeNode)
        names = mrmlio.segmentNames(segmentationNode, segmentIds)
        originals = mrmlio.paintedMasks(segmentationNode, names, volumeNode, full.shape)
        memories = {sid: self.store.memory(segmentationNode, sid, volumeNode) for sid in names}
        layout = planning.findLayout(
            originals,
            memories,
            names,
            options.axis,
            options.slice_range,
            fullGeometry.ijk_to_ras(),
        )
        array, geometry = session.crop(layout.axis, layout.lo, layout.hi)
        return Plan(
            volumeNode=volumeNode,
            segmentationNode=segmentationNode,
            names=names,
            layout=layout,
            groups=planning.groupSegments(list(names), layout),
            originals=originals,
            array=array,
            geometry=geometry,
            session=session,
            options=options,
            factory=self.segmenterFactory,
        )

    # ------------------------------------------------------------ running

    def startPropagation(
        self,
        volumeNode: slicer.vtkMRMLScalarVolumeNode | None,
        segmentationNode: slicer.vtkMRMLSegmentationNode | None,
        segmentIds: Iterable[str] | None = None,
        options: PropagationOptions | None = None,
        allVisible: bool = False,
    ) -> PropagationJob:
        """Read the inputs on the main thread and start the engine on a background thread.

        Wait for the returned job on the main thread with :func:`.task.waitWithEvents` (the
        panel) or ``job.wait()`` (scripts); when it has finished, call
        :meth:`finishPropagation` on the main thread to write the result.
        """
        self._idle()
        if segmentIds is None and segmentationNode is not None and allVisible:
            segmentIds = self.defaultSegmentIds(segmentationNode, allVisible=True)
        plan = self._plan(volumeNode, segmentationNode, segmentIds, options or PropagationOptions())
        if self.segmenterFactory is defaultFactory and plan.session.segmenter is None:
            with userErrors():  # import torch here, on the main thread, not in the worker
                import oflsam2.segmenter  # noqa: F401
        job = PropagationJob(plan)
        self.store.active = job
        job.start()
        return job

    def _release(self, job: PropagationJob) -> None:
        """Take a finished job off the store; raise the user's error if it did not succeed."""
        status = job.poll()
        if not status.finished:
            raise RuntimeError("finishPropagation() needs a finished job: poll() it first")
        if self.store.active is job:
            self.store.active = None
        if job.finishedWriting:
            raise RuntimeError("this job's result was already written")
        if job.task.cancelRequested:
            status = replace(status, state="cancelled")
        error = taskError(status)
        if error is not None:
            raise error
        if status.state == "failed":
            raise status.error

    def finishPropagation(
        self, job: PropagationJob, beforeWrite: Callable[[], None] | None = None
    ) -> PropagationResult:
        """Write a finished job's result into its segments (main thread only).

        Checks that nothing was cancelled, removed or edited meanwhile, saves the undo state
        (``beforeWrite`` first, e.g. the Segment Editor's own undo; then this logic's
        segmentation history), then writes only the chosen segments, painted slices unchanged.
        """
        self._release(job)
        plan = job.plan
        segNode, volumeNode = plan.segmentationNode, plan.volumeNode
        mrmlio.checkUnchanged(segNode, volumeNode, plan.names, plan.originals)
        labels = [np.asarray(result.labels) for result in job.engineResults]
        new = planning.merge(plan.layout, plan.groups, labels, plan.originals)
        changed = {
            sid: mask for sid, mask in new.items() if not np.array_equal(mask, plan.originals[sid])
        }
        if changed:
            history = self.store.history(segNode)
            mrmlio.writeSegments(segNode, volumeNode, changed, history, beforeWrite)
        job.finishedWriting = True
        for sid, mask in new.items():
            memory = WriteMemory.of(plan.layout.axis, plan.layout.annotated[sid], mask)
            self.store.remember(segNode, sid, volumeNode, memory)
        return job.result(new)

    def propagate(
        self,
        volumeNode: slicer.vtkMRMLScalarVolumeNode | None,
        segmentationNode: slicer.vtkMRMLSegmentationNode | None,
        segmentIds: Iterable[str] | None = None,
        allVisible: bool = False,
        beforeWrite: Callable[[], None] | None = None,
        **options: Any,
    ) -> PropagationResult:
        """Propagate and write, blocking until done: for scripts, the console and tests.

        ``options`` go to :meth:`PropagationOptions.build`: ``axis``, ``slice_range``,
        ``settings`` (a :class:`~oflsam2.settings.Settings`) and any ``Settings`` field to
        change (backbone, model, image_size, device, online, gamma, fit_steps, ...). Raises
        :class:`OFLSAM2UserError` with a one-line message for anything the user can fix.
        """
        with userErrors():
            built = PropagationOptions.build(**options)
        job = self.startPropagation(volumeNode, segmentationNode, segmentIds, built, allVisible)
        job.wait()
        return self.finishPropagation(job, beforeWrite)

    # ------------------------------------------------------------ learners

    def _idle(self) -> None:
        """One engine task at a time (a propagation, or a learner being saved or applied)."""
        active = self.store.active
        if active is not None and not active.poll().finished:
            what = "A propagation" if isinstance(active, PropagationJob) else "A learner task"
            raise OFLSAM2UserError(f"{what} is already running: wait for it or cancel it")

    def startSaveLearner(
        self,
        volumeNode: slicer.vtkMRMLScalarVolumeNode | None,
        segmentationNode: slicer.vtkMRMLSegmentationNode | None,
        path: str,
        segmentIds: Iterable[str] | None = None,
        **options: Any,
    ) -> learners.LearnerJob:
        """Read the chosen segments as they are now and train a learner on them in the
        background (see :mod:`.learners`); ``options`` as for :meth:`propagate`. Wait for the
        job as for a propagation, then call :meth:`finishSaveLearner`."""
        self._idle()
        with userErrors():
            built = PropagationOptions.build(**options)
        ids = list(segmentIds) if segmentIds else None
        job = learners.startSave(
            volumeNode, segmentationNode, ids, path, built.settings, self.segmenterFactory
        )
        self.store.active = job
        return job

    def finishSaveLearner(self, job: learners.LearnerJob) -> str:
        """The path the finished job wrote; its error if it failed or was cancelled."""
        self._release(job)
        job.finishedWriting = True
        return job.result

    def saveLearner(self, *args: Any, **kwargs: Any) -> str:
        """:meth:`startSaveLearner` and :meth:`finishSaveLearner`, blocking: for scripts."""
        job = self.startSaveLearner(*args, **kwargs)
        job.wait()
        return self.finishSaveLearner(job)

    def startApplyLearner(
        self,
        volumeNode: slicer.vtkMRMLScalarVolumeNode | None,
        segmentationNode: slicer.vtkMRMLSegmentationNode | None,
        path: str,
        **options: Any,
    ) -> learners.LearnerJob:
        """Segment ``volumeNode`` with a learner file in the background, no painted slice
        needed; :meth:`finishApplyLearner` writes the learner's segments (by name) undoably."""
        self._idle()
        with userErrors():
            built = PropagationOptions.build(**options)
        job = learners.startApply(
            volumeNode, segmentationNode, path, built.settings, self.segmenterFactory
        )
        self.store.active = job
        return job

    def finishApplyLearner(
        self, job: learners.LearnerJob, beforeWrite: Callable[[], None] | None = None
    ) -> learners.AppliedLearner:
        """Write a finished Apply learner job (main thread only; undo with :meth:`undo`)."""
        self._release(job)
        segNode = job.plan.segmentationNode
        result = learners.writeApplied(
            job.plan, job.result, lambda: self.store.history(segNode), beforeWrite
        )
        job.finishedWriting = True
        return result

    def applyLearner(
        self, *args: Any, beforeWrite: Callable[[], None] | None = None, **kwargs: Any
    ) -> learners.AppliedLearner:
        """:meth:`startApplyLearner` and :meth:`finishApplyLearner`, blocking: for scripts."""
        job = self.startApplyLearner(*args, **kwargs)
        job.wait()
        return self.finishApplyLearner(job, beforeWrite)

    # ------------------------------------------------------------ guidance

    @staticmethod
    def jumpToSlice(nextSlice: NextSlice | None) -> bool:
        """Move the slice views to the suggested slice (through the segment's centre there);
        False when there is no suggestion. Each view keeps its own jump mode."""
        if nextSlice is None:
            return False
        slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, *nextSlice.ras)
        return True

    # ------------------------------------------------------------ undo

    def canUndo(self, segmentationNode: slicer.vtkMRMLSegmentationNode | None) -> bool:
        """Whether :meth:`undo` has a state saved before a propagation to go back to."""
        return self.store.canUndo(segmentationNode)

    def undo(self, segmentationNode: slicer.vtkMRMLSegmentationNode) -> bool:
        """Restore the segmentation as it was before the last propagation; False if there is none.

        Works whether or not the scene's own undo is enabled (Slicer leaves it off by default).
        """
        return self.store.undo(segmentationNode)

    # ------------------------------------------------------------ export

    def exportSegments(
        self,
        segmentationNode: slicer.vtkMRMLSegmentationNode | None,
        segmentIds: Iterable[str] | None,
        volumeNode: slicer.vtkMRMLScalarVolumeNode | None,
        path: str,
    ) -> str:
        """Save segments on the reference volume's exact grid (see :func:`.mrmlio.exportSegments`).

        ``.seg.nrrd``: a Slicer segmentation; ``.nii``, ``.nii.gz``, ``.nrrd``, ``.mha``: a
        label map, segment i = label i+1. Written whole or not at all.
        """
        if segmentationNode is None:
            raise OFLSAM2UserError("No segmentation: select the segmentation to export")
        if volumeNode is None:
            raise OFLSAM2UserError(
                "No reference volume: select the volume whose grid the export should use"
            )
        ids = list(segmentIds) if segmentIds else self.defaultSegmentIds(segmentationNode)
        return mrmlio.exportSegments(segmentationNode, ids, volumeNode, path)

    # ------------------------------------------------------------ weights and dependencies

    installationFor = staticmethod(dependencies.installationFor)
    missingPythonPackages = staticmethod(dependencies.missingPythonPackages)
    weightsStatus = staticmethod(dependencies.weightsStatus)
    cachedWeightsStatus = staticmethod(dependencies.cachedWeightsStatus)
    forgetWeightsStatus = staticmethod(dependencies.forgetWeightsStatus)
    startDownload = staticmethod(dependencies.startDownload)
    importWeights = staticmethod(dependencies.importWeights)
