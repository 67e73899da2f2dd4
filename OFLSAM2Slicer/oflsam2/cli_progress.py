"""Progress on stderr for the command line: a bar on a terminal, a few plain lines in a log.

On a terminal each stage gets a tqdm bar that redraws itself in place. Anywhere else (CI, a
pipe, a log file) a bar would write one carriage-return frame per step, so a stage writes one
line when it starts, one every ``every`` seconds while it runs, and one when it ends.

Rates never count a step that was done before the stage was first heard of: the engine reports
a step when it is finished, so the first event of a stage already says ``done = 1`` (or a
whole batch); counting it against the microseconds since the bar was made gave rates of
hundreds of thousands of steps per second. Both the bar (tqdm's ``initial``) and the lines
measure from the first event on, and the lines give no rate measured over less than a second.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from .progress import ProgressEvent

LOG_EVERY_S = 10.0  # seconds between two lines of one stage when stderr is not a terminal
RATE_AFTER_S = 1.0  # a rate measured over less time than this is noise: none is written


def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {s % 60:02.0f} s"


class ProgressLines:
    """One stage at a time as log lines: start, every ``every`` seconds, end.

    ``update(stage, done, total)`` for each report; a new ``stage`` ends the previous one;
    ``close()`` ends the last. ``clock`` is for tests.
    """

    def __init__(
        self,
        stream: TextIO,
        unit: str = "step",
        every: float = LOG_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream, self.unit, self.every, self.clock = stream, unit, every, clock
        self.stage: str | None = None
        self._start = self._last_line = self._last_event = 0.0
        self._base = self.done = self.total = 0

    def _write(self, text: str) -> None:
        print(f"oflsam2: {text}", file=self.stream, flush=True)

    def _rate(self, now: float) -> str:
        steps, seconds = self.done - self._base, now - self._start
        if steps <= 0 or seconds < RATE_AFTER_S:
            return ""
        return f", {steps / seconds:.3g} {self.unit}/s"

    def _count(self) -> str:
        if self.total:
            return f"{self.done}/{self.total} {self.unit}s ({100 * self.done / self.total:.0f}%)"
        return f"{self.done} {self.unit}s"

    def update(self, stage: str, done: int, total: int) -> None:
        now = self.clock()
        if stage != self.stage:
            self.close()
            self.stage, self._start, self._last_line, self._base = stage, now, now, done
            self.done, self.total, self._last_event = done, total, now
            size = f" ({total} {self.unit}s)" if total else ""
            self._write(f"{stage}: started{size}")
            return
        self.done, self.total, self._last_event = done, total, now
        finished = bool(total) and done >= total  # the end line follows: no line twice
        if now - self._last_line >= self.every and not finished:
            self._last_line = now
            self._write(
                f"{stage}: {self._count()} after {_seconds(now - self._start)}{self._rate(now)}"
            )

    def close(self) -> None:
        """End the current stage (if any) with its last count, time and rate."""
        if self.stage is None:
            return
        end = self._last_event
        self._write(
            f"{self.stage}: {self._count()} in {_seconds(end - self._start)}{self._rate(end)}"
        )
        self.stage = None


class ProgressBars:
    """The engine's :class:`~oflsam2.progress.ProgressEvent` s on ``stream`` (stderr): a tqdm
    bar per stage on a terminal, :class:`ProgressLines` otherwise; nothing when ``quiet``."""

    def __init__(
        self, quiet: bool, stream: TextIO | None = None, every: float = LOG_EVERY_S
    ) -> None:
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.stage: str | None = None
        self.bar = None
        self.lines = None if is_terminal(self.stream) else ProgressLines(self.stream, every=every)

    def __call__(self, event: ProgressEvent) -> None:
        if self.quiet:
            return
        stage, done, total = event.label(), event.done, event.total
        if self.lines is not None:
            self.lines.update(stage, done, total)
            return
        from tqdm import tqdm

        if stage != self.stage or self.bar is None:
            self.close()
            self.stage = stage
            # ``initial``: the steps already done when the stage is first heard of are not
            # part of the rate (see the module docstring)
            self.bar = tqdm(
                total=total, initial=done, desc=stage, unit="step", file=self.stream, leave=False
            )
            return
        if self.bar.total != total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.lines is not None:
            self.lines.close()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.stage = None
