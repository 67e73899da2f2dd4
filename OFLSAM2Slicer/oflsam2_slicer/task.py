"""Work on a background thread, waited for on the GUI thread, with progress as data and a cancel flag.

How the GUI waits (issue 9): in Slicer the main thread holds Python's GIL while it sits in
the Qt event loop (CTK initialises PythonQt and never releases it), so a Python worker
thread that a QTimer polls runs only during the few milliseconds of each poll callback: a
propagation that takes a minute from the command line would take many minutes in the panel.
Of the two ways out, this module takes the **main-thread wait loop** (SlicerNNInteractive's):
:func:`waitWithEvents` waits for the worker in short slices that release the GIL and calls
``slicer.app.processEvents()`` between them, so the worker runs at full speed and the GUI
stays live (progress bar, Cancel, views). Chosen over a child process running the engine
because it keeps one process: the segmenter and its feature cache stay in Slicer's Python
(nothing of 100+ MB to serialise, no second copy of torch and the model in memory, no
``PythonSlicer`` launcher environment to reproduce on three platforms), every path is the
one the tests run, and it is a few lines. What it does not give: a crash or out-of-memory
inside torch still takes Slicer down, as with any in-process extension, and the panel runs
a nested event loop while it waits (its own buttons are disabled meanwhile, closing the
scene cancels). :class:`TaskRunner` wraps the loop for a panel: one task at a time, and
the panel is always given back, whatever is raised.
"""

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

# The GUI thread's wait loop: seconds per GIL-free wait, and between two progress updates.
WAIT_SLICE = 0.03
POLL_INTERVAL = 0.2


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
        self._finished = threading.Event()
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
        self._finished.set()

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
        """Block until the task ends (or ``timeout`` passes), releasing the GIL meanwhile.

        For scripts and tests; the GUI calls :func:`waitWithEvents`, which calls this in
        short slices.
        """
        if self._thread is None:
            raise RuntimeError("the task was never started")
        self._finished.wait(timeout)
        return self.poll()

    @property
    def result(self) -> Any:
        return self._result


def waitWithEvents(
    task: Any,
    processEvents: Callable[[], Any],
    onPoll: Callable[[TaskStatus], Any] | None = None,
    pollInterval: float = POLL_INTERVAL,
    waitSlice: float = WAIT_SLICE,
) -> TaskStatus:
    """Wait on the GUI thread until ``task`` has finished, keeping the GUI alive.

    ``task`` is anything with ``wait(timeout) -> TaskStatus`` (:class:`BackgroundTask`,
    :class:`~.job.PropagationJob`). Each turn waits up to ``waitSlice`` seconds with the GIL
    released (the worker runs), then calls ``processEvents()`` (in Slicer
    ``slicer.app.processEvents``: clicks, repaints, Cancel) and, every ``pollInterval``
    seconds, ``onPoll(status)`` (progress bar, status line). Returns the final status. See
    the module docstring for why the GUI waits this way rather than polling from a timer.
    """
    last = time.perf_counter()
    while True:
        status = task.wait(waitSlice)
        if status.finished:
            break
        processEvents()
        now = time.perf_counter()
        if onPoll is not None and now - last >= pollInterval:
            last = now
            onPoll(task.wait(0))
    if onPoll is not None:
        onPoll(status)
    return status


class TaskRunner:
    """One background task at a time for a panel, waited for with :func:`waitWithEvents`.

    ``refresh()`` updates the panel (buttons from :attr:`running`); :meth:`run` calls it
    when a task starts and, in a ``finally``, when it ends, so the panel never stays
    "running" after an error, whatever ``start`` or ``finish`` raise (Slicer's
    ``tryWithErrorDisplay`` shows an error and raises it again).
    """

    def __init__(
        self, refresh: Callable[[], Any], processEvents: Callable[[], Any] = lambda: None
    ) -> None:
        self.refresh = refresh
        self.processEvents = processEvents
        self.task: Any = None

    @property
    def running(self) -> bool:
        return self.task is not None

    def run(
        self,
        start: Callable[[], Any],
        finish: Callable[[Any], Any],
        onPoll: Callable[[TaskStatus], Any] | None = None,
    ) -> Any:
        """``task = start()`` (None: nothing to do), wait for it, then ``finish(task)``.

        Returns what ``finish`` returns (None when nothing ran or a task is already running).
        """
        if self.task is not None:
            return None
        try:
            task = start()
            if task is None:
                return None
            self.task = task
            self.refresh()
            waitWithEvents(task, self.processEvents, onPoll)
            return finish(task)
        finally:
            self.task = None
            self.refresh()

    def cancel(self) -> bool:
        """Ask the running task to stop; False when none runs."""
        if self.task is None:
            return False
        self.task.cancel()
        return True


class Job:
    """A :class:`BackgroundTask` with what the logic keeps beside it: the ``plan`` read on the
    main thread, and whether its result was written (the logic releases every job alike)."""

    def __init__(self, task: BackgroundTask, plan: Any = None) -> None:
        self.task = task
        self.plan = plan
        self.finishedWriting = False

    def start(self) -> None:
        self.task.start()

    def poll(self) -> TaskStatus:
        return self.task.poll()

    def cancel(self) -> None:
        self.task.cancel()

    def wait(self, timeout: float | None = None) -> TaskStatus:
        return self.task.wait(timeout)
