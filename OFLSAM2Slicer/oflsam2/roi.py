"""In-plane square region of interest: crop before resizing, paste results back exactly."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Roi:
    """Square crop [r0, r0 + side) x [c0, c0 + side); parts outside the slice read as zero."""

    r0: int
    c0: int
    side: int

    def crop(self, img: np.ndarray) -> np.ndarray:
        h, w = img.shape
        out = np.zeros((self.side, self.side), dtype=img.dtype)
        rs, cs = max(self.r0, 0), max(self.c0, 0)
        re, ce = min(self.r0 + self.side, h), min(self.c0 + self.side, w)
        if re > rs and ce > cs:
            out[rs - self.r0 : re - self.r0, cs - self.c0 : ce - self.c0] = img[rs:re, cs:ce]
        return out

    def paste(self, small: np.ndarray, shape: tuple[int, int], fill=0) -> np.ndarray:
        """Inverse of crop: a full slice holding ``small`` where the crop was."""
        h, w = shape
        out = np.full((h, w), fill, dtype=small.dtype)
        rs, cs = max(self.r0, 0), max(self.c0, 0)
        re, ce = min(self.r0 + self.side, h), min(self.c0 + self.side, w)
        if re > rs and ce > cs:
            out[rs:re, cs:ce] = small[rs - self.r0 : re - self.r0, cs - self.c0 : ce - self.c0]
        return out

    def contains(self, mask2d: np.ndarray) -> bool:
        rows, cols = np.nonzero(mask2d)
        if rows.size == 0:
            return True
        return (
            rows.min() >= self.r0
            and cols.min() >= self.c0
            and rows.max() < self.r0 + self.side
            and cols.max() < self.c0 + self.side
        )


def compute_roi(
    mask2d: np.ndarray,
    mode: str = "auto",
    margin: float = 0.6,
    min_pad: int = 8,
    min_side: int = 32,
) -> Roi:
    """A square around the painted area with a generous margin (``auto``), or the whole slice (``none``).

    Small structures get more of the encoder's tokens; big ones end up with the whole slice.
    """
    h, w = mask2d.shape
    full = Roi((h - max(h, w)) // 2, (w - max(h, w)) // 2, max(h, w))
    if mode == "none" or not np.any(mask2d):
        return full
    rows, cols = np.nonzero(mask2d)
    r_lo, r_hi, c_lo, c_hi = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    extent = max(r_hi - r_lo, c_hi - c_lo)
    side = int(np.ceil(extent * (1.0 + 2 * margin))) + 2 * min_pad
    side = max(side, min_side)
    if side >= max(h, w):
        return full
    cr, cc = (r_lo + r_hi) / 2.0, (c_lo + c_hi) / 2.0
    r0 = int(round(cr - side / 2.0))
    c0 = int(round(cc - side / 2.0))
    # Keep the square inside the slice where it fits, so no tokens are spent on padding.
    if side <= h:
        r0 = min(max(r0, 0), h - side)
    if side <= w:
        c0 = min(max(c0, 0), w - side)
    return Roi(r0, c0, side)


def mask_box(
    mask2d: np.ndarray, grow: float = 0.0, pad: float = 0.0
) -> tuple[float, float, float, float] | None:
    """xyxy box (pixel edges) of a 2D mask, each side moved out by ``grow`` x extent + ``pad``."""
    rows, cols = np.nonzero(mask2d)
    if rows.size == 0:
        return None
    x0, x1 = cols.min(), cols.max() + 1
    y0, y1 = rows.min(), rows.max() + 1
    gx, gy = grow * (x1 - x0) + pad, grow * (y1 - y0) + pad
    return (x0 - gx, y0 - gy, x1 + gx, y1 + gy)
