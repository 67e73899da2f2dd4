"""MRML glue between 3D Slicer nodes and the ``oflsam2`` engine.

Needs ``slicer`` (MRML and ``slicer.util``) but never Qt, so the same code runs inside
Slicer, in Slicer's Python console without a GUI, and under the ``slicer-core`` pip
package in tests. The GUI lives in ``OFLSAM2Slicer.py`` and only wires widgets to this.
"""

from .logic import (
    Device,
    Model,
    OFLSAM2Logic,
    OFLSAM2UserError,
    PropagationCancelled,
    PropagationJob,
    PropagationOptions,
    PropagationResult,
    Quality,
    SliceAxis,
    TaskStatus,
)

__all__ = [
    "Device",
    "Model",
    "OFLSAM2Logic",
    "OFLSAM2UserError",
    "PropagationCancelled",
    "PropagationJob",
    "PropagationOptions",
    "PropagationResult",
    "Quality",
    "SliceAxis",
    "TaskStatus",
]
