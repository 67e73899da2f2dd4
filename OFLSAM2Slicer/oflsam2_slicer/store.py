"""Per-volume sessions, write memories and undo histories of one logic instance.

One segmenter is kept per volume node, so re-propagating after a correction reuses the
encoded slices; it is dropped when the volume node leaves the scene or the scene closes.
The store watches the scene with plain VTK observers (no Qt) that hold it weakly, and
removes them in :meth:`Store.unwatch` (the logic's ``cleanup()``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import slicer

from oflsam2.volume import Geometry

from . import mrmlio
from .planning import WriteMemory, take

UNDO_STATES = 5  # propagations the logic's own undo history can take back


@dataclass
class Session:
    """One volume node's segmenter and the array it was given (same object => cache kept)."""

    key: tuple
    segmenter: Any = None
    source: tuple | None = None  # (image data MTime, IJK-to-RAS) the array was copied at
    array: np.ndarray | None = None
    geometry: Geometry | None = None
    crops: dict = field(default_factory=dict)  # (axis, lo, hi) -> (array view, geometry)

    def load(self, volumeNode: slicer.vtkMRMLScalarVolumeNode) -> tuple[np.ndarray, Geometry]:
        """The session's copy of the voxels; the same object while the volume is unchanged."""
        source = mrmlio.volumeSource(volumeNode)
        if self.array is None or self.source != source:
            self.array, self.geometry = mrmlio.volumeInput(volumeNode)
            self.source = source
            self.crops.clear()
        return self.array, self.geometry

    def crop(self, axis: int, lo: int, hi: int) -> tuple[np.ndarray, Geometry]:
        """Slices ``lo..hi`` along ``axis`` (a view; the same object for the same range) and their grid."""
        if lo == 0 and hi == self.array.shape[axis] - 1:
            return self.array, self.geometry
        key = (axis, lo, hi)
        if key not in self.crops:
            self.crops.clear()
            ijk = 2 - axis
            shift = np.eye(4)
            shift[ijk, 3] = lo
            size = list(self.geometry.size)
            size[ijk] = hi - lo + 1
            self.crops[key] = (
                self.array[take(axis, slice(lo, hi + 1))],
                Geometry.from_ijk_to_ras(self.geometry.ijk_to_ras() @ shift, size),
            )
        return self.crops[key]


class _Observer:
    """A scene observer that calls ``store.<method>`` while the store lives, and removes itself after."""

    def __init__(self, store: Store, method: str) -> None:
        self._store = weakref.ref(store)
        self._method = method
        self.tag: int | None = None

    def __call__(self, caller, event) -> None:
        store = self._store()
        if store is not None:
            getattr(store, self._method)(caller, event)
        elif self.tag is not None:
            caller.RemoveObserver(self.tag)


WriteKey = tuple[str, str, str]  # (segmentation node ID, segment ID, volume node ID)


class Store:
    """Sessions, write memories and undo histories, dropped with their nodes or the scene."""

    def __init__(self) -> None:
        self.sessions: dict[str, Session] = {}  # volume node ID -> session
        self.written: dict[WriteKey, WriteMemory] = {}
        self.histories: dict[str, Any] = {}  # segmentation node ID -> vtkSegmentationHistory
        # the engine job (propagation or learner) started last, until it is finished
        self.active: Any = None
        self._scene = None
        self._tags: list[int] = []

    # ------------------------------------------------------------ scene life cycle

    def watch(self, scene: slicer.vtkMRMLScene) -> None:
        """Observe ``scene``; forget everything of a previous scene."""
        if scene is self._scene:
            return
        self.unwatch()
        self.clear()
        self._scene = scene
        for event, method in (
            (scene.NodeRemovedEvent, "_onNodeRemoved"),
            (scene.StartCloseEvent, "_onStartClose"),
            (scene.EndCloseEvent, "_onEndClose"),
        ):
            observer = _Observer(self, method)
            observer.tag = scene.AddObserver(event, observer)
            self._tags.append(observer.tag)

    def unwatch(self) -> None:
        """Remove the scene observers."""
        if self._scene is not None:
            for tag in self._tags:
                self._scene.RemoveObserver(tag)
        self._scene, self._tags = None, []

    @property
    def watching(self) -> bool:
        return self._scene is not None

    def clear(self) -> None:
        self.sessions.clear()
        self.written.clear()
        self.histories.clear()

    def _present(self, nodeId: str) -> bool:
        return self._scene is not None and self._scene.GetNodeByID(nodeId) is not None

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

    # ------------------------------------------------------------ sessions and memories

    def session(self, volumeNode: slicer.vtkMRMLScalarVolumeNode, key: tuple) -> Session:
        """The volume's session; a new one (new segmenter, new cache) when ``key`` changed."""
        self.watch(volumeNode.GetScene())
        session = self.sessions.get(volumeNode.GetID())
        if session is None or session.key != key:
            session = self.sessions[volumeNode.GetID()] = Session(key)
        return session

    @staticmethod
    def _key(segmentationNode, segmentId: str, volumeNode) -> WriteKey:
        return (segmentationNode.GetID(), segmentId, volumeNode.GetID())

    def memory(
        self,
        segmentationNode: slicer.vtkMRMLSegmentationNode,
        segmentId: str,
        volumeNode: slicer.vtkMRMLScalarVolumeNode,
    ) -> WriteMemory | None:
        """What the last propagation wrote into this segment on this volume's grid, if anything."""
        return self.written.get(self._key(segmentationNode, segmentId, volumeNode))

    def remember(
        self,
        segmentationNode: slicer.vtkMRMLSegmentationNode,
        segmentId: str,
        volumeNode: slicer.vtkMRMLScalarVolumeNode,
        memory: WriteMemory,
    ) -> None:
        self.written[self._key(segmentationNode, segmentId, volumeNode)] = memory

    # ------------------------------------------------------------ undo

    def history(
        self, segmentationNode: slicer.vtkMRMLSegmentationNode
    ) -> slicer.vtkSegmentationHistory:
        """The segmentation's own undo history (a ``vtkSegmentationHistory``), made on first use."""
        history = self.histories.get(segmentationNode.GetID())
        if history is None:
            history = slicer.vtkSegmentationHistory()
            history.SetMaximumNumberOfStates(UNDO_STATES)
            self.histories[segmentationNode.GetID()] = history
        history.SetSegmentation(segmentationNode.GetSegmentation())
        return history

    def canUndo(self, segmentationNode: slicer.vtkMRMLSegmentationNode | None) -> bool:
        if segmentationNode is None or segmentationNode.GetID() not in self.histories:
            return False
        return bool(self.histories[segmentationNode.GetID()].IsRestorePreviousStateAvailable())

    def undo(self, segmentationNode: slicer.vtkMRMLSegmentationNode) -> bool:
        """Restore the state saved before the last propagation, and forget what it wrote."""
        if not self.canUndo(segmentationNode):
            return False
        ok = bool(self.histories[segmentationNode.GetID()].RestorePreviousState())
        for key in [k for k in self.written if k[0] == segmentationNode.GetID()]:
            del self.written[key]
        return ok
