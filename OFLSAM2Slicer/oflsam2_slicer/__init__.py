"""MRML glue between 3D Slicer nodes and the ``oflsam2`` engine.

Needs ``slicer`` (MRML and ``slicer.util``) but never Qt, so the same code runs inside
Slicer, in Slicer's Python console without a GUI, and under the ``slicer-core`` pip
package in tests. The GUI lives in ``OFLSAM2Slicer.py`` and only wires widgets to this.

Modules: ``errors`` (user errors, engine errors as one-line messages), ``options`` (the
panel's choices, :class:`PropagationOptions`), ``task`` (background thread, status, the
GUI thread's wait loop), ``panel`` (which controls the panel enables), ``reloading``
(developer reload),
``planning`` (paint, axis, groups, merging: numpy only), ``mrmlio`` (reading, writing and
exporting nodes), ``store`` (per-volume sessions, write memories, undo histories), ``job``
(one propagation), ``review`` (the slice to paint next, the confidence per slice),
``dependencies`` (Python packages, model weights) and ``logic`` (:class:`OFLSAM2Logic`, which
ties them together).
"""

from .dependencies import REQUIRED_IMPORTS
from .errors import (
    DownloadCancelled,
    OFLSAM2UserError,
    PropagationCancelled,
    TaskCancelled,
    userError,
    userMessage,
)
from .job import PropagationJob, PropagationResult
from .logic import OFLSAM2Logic
from .options import Device, Model, PropagationOptions, Quality, SliceAxis
from .panel import PanelState, applyPanelState, panelState
from .review import NextSlice, SliceConfidence
from .task import BackgroundTask, TaskRunner, TaskStatus, taskError, waitWithEvents

__all__ = [
    "REQUIRED_IMPORTS",
    "BackgroundTask",
    "Device",
    "DownloadCancelled",
    "Model",
    "NextSlice",
    "OFLSAM2Logic",
    "OFLSAM2UserError",
    "PanelState",
    "PropagationCancelled",
    "PropagationJob",
    "PropagationOptions",
    "PropagationResult",
    "Quality",
    "SliceAxis",
    "SliceConfidence",
    "TaskCancelled",
    "TaskRunner",
    "TaskStatus",
    "applyPanelState",
    "panelState",
    "taskError",
    "userError",
    "userMessage",
    "waitWithEvents",
]
