"""Work on a background thread that a GUI timer polls, with progress as data and a cancel flag."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from oflsam2.errors import Cancelled
from oflsam2.progress import FIT, Progress, ProgressEvent

from .errors import (
    DownloadCancelled,
    OFLSAM2UserError,
    PropagationCancelled,
    TaskCancelled,
    userError,
    userMessage,
)

# What a task does (names its thread, and its cancellation message).
TASK, PROPAGATION, DOWNLOAD = "task", "propagation", "download"

# Stages the glue reports itself, beside the engine's ENCODE, FIT and PROPAGATE.
LOADING = "loading model"
DOWNLOADING = "downloading"

Work = Callable[[Progress, threading.Event], Any]


@dataclass(frozen=True)
class TaskStatus:
    """A snapshot of a background task, cheap to take from a GUI timer."""

    state: str  # idle, running, done, failed, cancelled
    event: ProgressEvent | None = None  # the last progress report
    elapsed: float = 0.0
    secondsPerItem: float | None = None  # in the current stage (and segment)
    error: BaseException | None = None
    kind: str = TASK
    names: Mapping[int, str] = field(default_factory=dict)  # label value -> segment name

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    @property
    def done(self) -> int:
        return self.event.done if self.event is not None else 0

    @property
    def total(self) -> int:
        return self.event.total if self.event is not None else 0

    @property
    def stage(self) -> str:
        """The current stage for people, e.g. ``propagate 'right lung'``; empty before any."""
        return self.event.label(dict(self.names)) if self.event is not None else ""

    def text(self) -> str:
        """One status line: stage, count, and speed (seconds per slice or per training step)."""
        if self.state == "idle":
            return "Ready"
        if self.state == "cancelled":
            return str(cancelledError(self.kind))
        if self.state == "failed":
            return f"Failed: {userMessage(self.error)}"
        parts = [self.stage or "starting"]
        if self.total:
            parts.append(f"{self.done}/{self.total}")
        if self.secondsPerItem is not None:
            unit = "step" if self.event is not None and self.event.stage == FIT else "slice"
            parts.append(f"{self.secondsPerItem:.2f} s/{unit}")
        parts.append(f"{self.elapsed:.0f} s")
        return " - ".join(parts)


def cancelledError(kind: str) -> TaskCancelled:
    """What the user is told when a task of this kind was cancelled."""
    if kind == PROPAGATION:
        return PropagationCancelled("Propagation cancelled: the segmentation was not changed")
    if kind == DOWNLOAD:
        return DownloadCancelled("Download cancelled: no weights were saved")
    return TaskCancelled("Cancelled: nothing was written")


def taskError(status: TaskStatus) -> OFLSAM2UserError | None:
    """The user-facing error of a finished task: its cancellation, or a failure the user can fix.

    None when it succeeded, or failed for a reason the user cannot fix (``status.error`` then
    holds the bug).
    """
    if status.state == "cancelled":
        return cancelledError(status.kind)
    if status.state == "failed":
        return userError(status.error)
    return None


class BackgroundTask:
    """Runs one function on a daemon thread; the GUI polls it with a timer instead of blocking.

    ``work(progress, cancel)`` gets a progress callback taking a
    :class:`~oflsam2.progress.ProgressEvent` that raises :class:`oflsam2.errors.Cancelled`
    once :meth:`cancel` was called, and the cancel event itself for code that checks it.
    ``names`` (label value -> segment name) name the segments in the status line. Built on
    ``threading`` only, so it runs without Qt.
    """

    def __init__(
        self, work: Work, kind: str = TASK, names: Mapping[int, str] | None = None
    ) -> None:
        self._work = work
        self._status = TaskStatus("idle", kind=kind, names=dict(names or {}))
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._t_end: float | None = None
        self._stage_t0 = 0.0
        self._result: Any = None

    @property
    def kind(self) -> str:
        return self._status.kind

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("a task can be started only once")
        self._t0 = self._stage_t0 = time.perf_counter()
        self._status = replace(self._status, state="running")
        self._thread = threading.Thread(target=self._run, name=f"oflsam2-{self.kind}", daemon=True)
        self._thread.start()

    def _progress(self, event: ProgressEvent) -> None:
        if self._cancel.is_set():
            raise Cancelled("cancelled by the user")
        with self._lock:
            last = self._status.event
            if last is None or (last.stage, last.segment) != (event.stage, event.segment):
                self._stage_t0 = time.perf_counter()
            self._status = replace(self._status, event=event)

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            result = self._work(self._progress, self._cancel)
        except Cancelled as exc:
            state, result, error = "cancelled", None, exc
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread by poll()
            state, result, error = "failed", None, exc
        else:
            state = "cancelled" if self._cancel.is_set() else "done"
        with self._lock:
            self._result = result
            self._status = replace(self._status, state=state, error=error)
            self._t_end = time.perf_counter()

    def poll(self) -> TaskStatus:
        """Current state, stage, progress and speed; never blocks for long."""
        with self._lock:
            status = self._status
            now = self._t_end if self._t_end is not None else time.perf_counter()
            rate = None
            if status.done > 0 and status.state == "running":
                rate = (now - self._stage_t0) / status.done
            elapsed = (now - self._t0) if self._t0 else 0.0
            return replace(status, elapsed=elapsed, secondsPerItem=rate)

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
