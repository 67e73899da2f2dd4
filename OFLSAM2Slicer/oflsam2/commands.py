"""Sub-commands of ``oflsam2``; each lives beside what it drives."""

from __future__ import annotations


def register(sub) -> None:
    from .cli_demo import register as demo
    from .cli_learner import register as learner
    from .cli_segment import register as segment
    from .cli_weights import register as weights

    segment(sub)
    learner(sub)
    weights(sub)
    demo(sub)
