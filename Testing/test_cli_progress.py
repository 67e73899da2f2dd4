"""Command-line progress: plain lines in logs (one per stage start, every 10 s, end), sane rates."""

from __future__ import annotations

import io
import re
import time

from oflsam2.cli_progress import ProgressBars, ProgressLines
from oflsam2.progress import ENCODE, FIT, PROPAGATE, ProgressEvent


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def rates(text: str) -> list[float]:
    return [float(r) for r in re.findall(r"([0-9.]+(?:e[+-]?\d+)?)\s*step/s", text)]


def test_a_log_gets_one_line_per_stage_start_every_10_s_and_end():
    out, clock = io.StringIO(), Clock()
    lines = ProgressLines(out, clock=clock)
    for done in range(1, 101):  # 100 steps of 0.25 s: 25 s in all
        lines.update("fit segment 5", done, 100)
        clock.now += 0.25
    clock.now += 100  # a long pause before the next stage: not part of the fit
    for done in range(1, 4):
        lines.update("propagate segment 5", done, 30)
        clock.now += 2.0
    lines.close()
    lines.close()  # twice: nothing more
    text = out.getvalue()
    assert "\r" not in text
    got = text.splitlines()
    assert got == [
        "oflsam2: fit segment 5: started (100 steps)",
        "oflsam2: fit segment 5: 41/100 steps (41%) after 10.0 s, 4 step/s",
        "oflsam2: fit segment 5: 81/100 steps (81%) after 20.0 s, 4 step/s",
        "oflsam2: fit segment 5: 100/100 steps (100%) in 24.8 s, 4 step/s",
        "oflsam2: propagate segment 5: started (30 steps)",
        "oflsam2: propagate segment 5: 3/30 steps (10%) in 4.0 s, 0.5 step/s",
    ]


def test_a_stage_that_completes_on_a_periodic_line_ends_once():
    out, clock = io.StringIO(), Clock()
    lines = ProgressLines(out, clock=clock)
    lines.update("encode", 8, 16)
    clock.now += 15
    lines.update("encode", 16, 16)  # 15 s later, and the last batch
    lines.close()
    assert out.getvalue().splitlines() == [
        "oflsam2: encode: started (16 steps)",
        "oflsam2: encode: 16/16 steps (100%) in 15.0 s, 0.533 step/s",
    ]


def test_the_first_step_of_a_stage_reports_no_rate():
    out, clock = io.StringIO(), Clock()
    lines = ProgressLines(out, clock=clock)
    lines.update("encode", 8, 8)  # one batch of 8, reported when done: no time to divide by
    clock.now += 1e-6
    lines.close()
    assert out.getvalue().splitlines() == [
        "oflsam2: encode: started (8 steps)",
        "oflsam2: encode: 8/8 steps (100%) in 0.0 s",
    ]


def test_progress_bars_write_lines_when_stderr_is_not_a_terminal():
    out = io.StringIO()
    bars = ProgressBars(quiet=False, stream=out)
    bars(ProgressEvent(ENCODE, None, 3, 3))
    for done in range(1, 51):
        bars(ProgressEvent(FIT, 5, done, 50))
    bars(ProgressEvent(PROPAGATE, 5, 1, 10))
    bars.close()
    text = out.getvalue()
    assert "\r" not in text
    got = text.splitlines()
    assert len(got) == 6  # start and end of three stages (each under 10 s)
    assert [g.split(":")[1].strip() for g in got] == [
        "encode",
        "encode",
        "fit segment 5",
        "fit segment 5",
        "propagate segment 5",
        "propagate segment 5",
    ]
    assert all(r < 1e5 for r in rates(text)), text


def test_quiet_writes_nothing():
    out = io.StringIO()
    bars = ProgressBars(quiet=True, stream=out)
    bars(ProgressEvent(FIT, 5, 1, 50))
    bars.close()
    assert out.getvalue() == ""


def test_a_terminal_gets_a_bar_whose_first_step_has_no_absurd_rate():
    out = Terminal()
    bars = ProgressBars(quiet=False, stream=out)
    bars(ProgressEvent(FIT, 5, 1, 20))  # the first report comes when step 1 is done
    first = out.getvalue()
    assert "\r" in first and "fit segment 5" in first
    assert rates(first) == [], first  # tqdm prints "?step/s" rather than 1 / (microseconds)
    for done in range(2, 6):
        time.sleep(0.12)  # past tqdm's 0.1 s refresh interval: a measured rate
        bars(ProgressEvent(FIT, 5, done, 20))
    bars.close()
    measured = rates(out.getvalue())
    assert measured and max(measured) < 20, out.getvalue()  # a step takes 0.12 s: about 8/s
