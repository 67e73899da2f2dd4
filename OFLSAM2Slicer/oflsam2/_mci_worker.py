"""Child process that runs ITK's MorphologicalContourInterpolator ("Fill between slices").

It lives in its own process because the ``itk`` package's contour interpolator and
SimpleITK corrupt each other's heap when loaded together (the process crashes). It must
therefore import neither SimpleITK nor anything of oflsam2 that does: only numpy and itk.

Protocol (private to :mod:`oflsam2.baselines`, which runs this file by path, so that not even
``oflsam2/__init__.py`` is imported): ``python _mci_worker.py DIR`` where
DIR holds ``job.json`` (``count``, ``axes``: one ITK axis per array, ``spacing`` in ITK (i, j, k)
order) and ``in_<n>.npy`` label arrays in (k, j, i) order; the worker writes ``out_<n>.npy``.
Exit 0 on success, 3 when the interpolator is not installed, 1 on any other failure, with
one line on stderr.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

MISSING_EXIT = 3


def _interpolate(itk, array, axis: int, spacing) -> object:
    import numpy as np

    image = itk.image_from_array(np.ascontiguousarray(array))
    image.SetSpacing([float(s) for s in spacing])
    filt = itk.MorphologicalContourInterpolator.New(image)
    # Slicer's vtkITKMorphologicalContourInterpolator settings, except that the axis is
    # given (Slicer passes -1, all axes; painted slices lie on one axis here).
    filt.SetLabel(0)  # all labels
    filt.SetAxis(int(axis))
    filt.SetHeuristicAlignment(True)
    filt.SetUseDistanceTransform(False)
    filt.SetUseBallStructuringElement(False)
    filt.Update()
    return itk.array_from_image(filt.GetOutput()).astype(array.dtype, copy=False)


def main(argv: list[str]) -> int:
    import numpy as np

    folder = Path(argv[0])
    job = json.loads((folder / "job.json").read_text())
    try:
        import itk

        itk.MorphologicalContourInterpolator  # noqa: B018  (lazy loading: fails here if absent)
    except (ImportError, AttributeError):
        print("itk-morphologicalcontourinterpolation is not installed", file=sys.stderr)
        return MISSING_EXIT
    for n in range(int(job["count"])):
        array = np.load(folder / f"in_{n}.npy", allow_pickle=False)
        out = _interpolate(itk, array, job["axes"][n], job["spacing"])
        np.save(folder / f"out_{n}.npy", out, allow_pickle=False)
    if "SimpleITK" in sys.modules:  # the crash this process exists to avoid
        print("SimpleITK was loaded beside itk in the interpolator process", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        code = main(sys.argv[1:])
    except Exception as exc:  # report one line; the parent turns it into an error
        # (oflsam2.errors.first_line, which this worker may not import)
        lines = str(exc).strip().splitlines()
        print(f"{type(exc).__name__}: {lines[0] if lines else ''}", file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: ITK's module destructors are where heap trouble shows.
    os._exit(code)
