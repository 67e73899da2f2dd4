"""Developer reload: forget the engine and glue packages so the next import reads the files again.

Slicer's "Reload" (developer mode) reads the module file ``OFLSAM2Slicer.py`` again, but the
packages it imports stay in ``sys.modules``; an edit to them would need a restart. The
widget's ``onReload`` calls :func:`forgetPackages` first, as scripted modules with their own
packages do, and the module file then imports fresh copies.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

PACKAGES = ("oflsam2", "oflsam2_slicer")


def ourModules(packages: Iterable[str] = PACKAGES) -> list[str]:
    """Names in ``sys.modules`` of ``packages`` and their submodules."""
    prefixes = tuple(packages)
    return sorted(
        name
        for name in list(sys.modules)
        if name in prefixes or name.startswith(tuple(p + "." for p in prefixes))
    )


def forgetPackages(packages: Iterable[str] = PACKAGES) -> list[str]:
    """Remove ``packages`` and their submodules from ``sys.modules``; returns their names.

    Objects made from the old modules keep working; new imports load the files again.
    """
    names = ourModules(packages)
    for name in names:
        sys.modules.pop(name, None)
    return names
