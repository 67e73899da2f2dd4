"""What the panel enables, worked out without Qt so the state machine is testable.

The widget in ``OFLSAM2Slicer.py`` calls :func:`panelState` with its parameter node and
whether a task runs, and :func:`applyPanelState` to set the widgets; a test does the same
with plain objects standing in for the widgets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Widgets (names in the .ui file) disabled while a task runs, besides the buttons below:
# the inputs and every option, so nothing the running task read can change under it.
INPUT_GROUPS = ("inputsCollapsibleButton", "modelCollapsibleButton", "advancedCollapsibleButton")

READY_TIP = "Propagate the painted slices through the volume"
NOT_READY_TIP = "Select the volume and the segmentation with a painted segment"
RUNNING_TIP = "A propagation, learner or download is running: wait for it or press Cancel"


@dataclass(frozen=True)
class PanelState:
    """Enabled state of each control (and the Propagate tooltip)."""

    propagate: bool
    propagateTip: str
    cancel: bool
    undo: bool
    export: bool
    inputs: bool  # the segment selector and the option groups
    sliceRange: bool  # first / last slice spin boxes
    nextSlice: bool = False  # the button that jumps the slice views to the suggested slice


def panelState(node: Any, running: bool, canUndo: bool, hasSuggestion: bool = False) -> PanelState:
    """The panel for parameter node ``node`` (None: no scene yet) while a task runs or not;
    ``hasSuggestion``: the last propagation suggested a slice to paint next."""
    ready = bool(
        node
        and node.inputVolume
        and node.segmentation
        and (node.segmentId or node.allVisibleSegments)
    )
    tip = RUNNING_TIP if running else READY_TIP if ready else NOT_READY_TIP
    return PanelState(
        propagate=ready and not running,
        propagateTip=tip,
        cancel=running,
        undo=bool(node) and not running and canUndo,
        export=bool(node and node.segmentation and node.inputVolume) and not running,
        inputs=not running,
        sliceRange=bool(node and node.limitSliceRange) and not running,
        nextSlice=bool(node) and hasSuggestion and not running,
    )


def applyPanelState(ui: Any, state: PanelState) -> None:
    """Set the widgets of ``ui`` (``slicer.util.childWidgetVariables`` of the .ui) to ``state``."""
    ui.propagateButton.enabled = state.propagate
    ui.propagateButton.toolTip = state.propagateTip
    ui.cancelButton.enabled = state.cancel
    ui.undoButton.enabled = state.undo
    ui.exportButton.enabled = state.export
    ui.segmentSelector.enabled = state.inputs
    for name in INPUT_GROUPS:
        getattr(ui, name).enabled = state.inputs
    ui.firstSliceSpinBox.enabled = state.sliceRange
    ui.lastSliceSpinBox.enabled = state.sliceRange
    ui.nextSliceButton.enabled = state.nextSlice
