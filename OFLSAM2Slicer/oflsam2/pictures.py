"""Slices as pictures, the way Slicer shows them: the radiological convention.

Slicer's slice views put the patient's right on the left of the screen and, in an axial view,
anterior up (coronal: superior up; sagittal: anterior on the left, superior up). An array
slice drawn as it lies in memory follows the file's voxel order instead, which differs from one
scanner and file format to the next (the sample CT of ``slicerio`` stores patient right at high
``i``, so drawn as is its right lung ends up on the picture's right). :func:`slice_view` reads
the image's direction matrix (:class:`oflsam2.volume.Geometry`) and returns the transpose and
flips that turn an array slice into a picture with ``origin="upper"`` (row 0 at the top), plus
the pixel aspect ratio. An oblique grid is shown by its closest axes (no resampling), as
Slicer does for a slice view aligned with the volume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .volume import Geometry

ORIENTATIONS = ("sagittal", "coronal", "axial")  # slice normal closest to R, A, S
# Slicer's slice views (vtkMRMLSliceNode::SetOrientationTo...): the RAS direction of the
# screen's x (to the right) and y (up) axes.
SCREEN = {
    "axial": ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((-1.0, 0.0, 0.0), (0.0, 0.0, 1.0)),
    "sagittal": ((0.0, -1.0, 0.0), (0.0, 0.0, 1.0)),
}
_LETTERS = ("L", "R", "P", "A", "I", "S")  # -R, +R, -A, +A, -S, +S


def _letter(ras: np.ndarray) -> str:
    a = int(np.argmax(np.abs(ras)))
    return _LETTERS[2 * a + (1 if ras[a] > 0 else 0)]


@dataclass(frozen=True)
class SliceView:
    """How to draw the slices across array axis ``axis`` (0 = k, 1 = j, 2 = i) of one grid."""

    axis: int
    orientation: str  # axial, coronal or sagittal (closest to the slices' normal)
    transpose: bool  # the slice's second array axis runs across the picture
    flip_rows: bool  # after the transpose: rows reversed so that the picture's top is "up"
    flip_cols: bool  # columns reversed so that the picture's right is the patient's left (...)
    aspect: float  # height / width of one pixel (for ``imshow(aspect=...)``)
    edges: tuple[str, str, str, str]  # patient side at the picture's left, right, top, bottom

    def __call__(self, plane: np.ndarray) -> np.ndarray:
        """A 2D slice (the two array axes other than ``axis``, in array order) as a picture."""
        out = np.asarray(plane)
        if out.ndim != 2:
            raise ValueError(f"a slice is 2D, not of shape {out.shape}")
        if self.transpose:
            out = out.T
        if self.flip_rows:
            out = out[::-1]
        if self.flip_cols:
            out = out[:, ::-1]
        return out

    def picture(self, volume: np.ndarray, index: int) -> np.ndarray:
        """Slice ``index`` of ``volume`` (k, j, i) across ``axis``, as a picture."""
        return self(np.take(volume, index, axis=self.axis))


def slice_view(geometry: Geometry, axis: int) -> SliceView:
    """The :class:`SliceView` of slices across array ``axis`` of an image on ``geometry``.

    Of the two in-plane array axes, the one closer to the screen's horizontal direction of
    Slicer's view of that orientation runs along the picture's columns, each flipped where it
    points against the screen (right) or up.
    """
    if axis not in (0, 1, 2):
        raise ValueError(f"axis is 0, 1 or 2 (k, j, i), not {axis}")
    m = geometry.ijk_to_ras()[:3, :3]
    inplane = [a for a in range(3) if a != axis]  # array axes of the 2D slice, in order
    dirs = [m[:, 2 - a] / np.linalg.norm(m[:, 2 - a]) for a in inplane]  # array axis a = ijk 2 - a
    spacing = [geometry.spacing[2 - a] for a in inplane]
    normal = np.cross(dirs[0], dirs[1])
    orientation = ORIENTATIONS[int(np.argmax(np.abs(normal)))]
    right, up = (np.asarray(v) for v in SCREEN[orientation])
    col = 1 if abs(dirs[1] @ right) >= abs(dirs[0] @ right) else 0
    row = 1 - col
    flip_cols = bool(dirs[col] @ right < 0)
    flip_rows = bool(dirs[row] @ up > 0)  # row index grows downwards on the picture
    return SliceView(
        axis=axis,
        orientation=orientation,
        transpose=col == 0,
        flip_rows=flip_rows,
        flip_cols=flip_cols,
        aspect=float(spacing[row] / spacing[col]),
        edges=(_letter(-right), _letter(right), _letter(up), _letter(-up)),
    )
