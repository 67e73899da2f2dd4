"""Progress as data: the engine reports what it does, callers decide how to show it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# Stages the engine reports, in the order a run goes through them.
ENCODE, FIT, PROPAGATE = "encode", "fit", "propagate"


@dataclass(frozen=True)
class ProgressEvent:
    """``done`` of ``total`` items of ``stage``; ``segment`` is the label value, or None."""

    stage: str
    segment: int | None
    done: int
    total: int

    def label(self, names: dict[int, str] | None = None) -> str:
        """``stage`` or ``stage 'name'`` for people (names: label value -> segment name)."""
        if self.segment is None:
            return self.stage
        name = (names or {}).get(self.segment, f"segment {self.segment}")
        return (
            f"{self.stage} '{name}'" if names and self.segment in names else f"{self.stage} {name}"
        )


Progress = Callable[[ProgressEvent], None]
