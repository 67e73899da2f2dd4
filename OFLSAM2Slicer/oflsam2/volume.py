"""Volumes with exact geometry: reading, writing, grid checks, annotated slices, windows.

Arrays are numpy arrays in (k, j, i) order (SimpleITK's order). Geometry is never
guessed from shapes: it travels beside every array as a :class:`Geometry`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError, first_line
from .files import atomic_path

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SEG_SUFFIX = ".seg.nrrd"
_GRID_TOL = 1e-4


@dataclass(frozen=True)
class Geometry:
    """Image grid: size in (i, j, k) order, spacing, origin and direction in LPS."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape in (k, j, i) order."""
        return (self.size[2], self.size[1], self.size[0])

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def ijk_to_lps(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras(self) -> np.ndarray:
        return LPS_TO_RAS @ self.ijk_to_lps()

    @classmethod
    def from_ijk_to_lps(cls, matrix: np.ndarray, size: tuple[int, int, int]) -> Geometry:
        m = np.asarray(matrix, dtype=float)
        spacing = np.linalg.norm(m[:3, :3], axis=0)
        if np.any(spacing <= 0):
            raise InputError(
                "the IJK-to-physical matrix has a zero column: fix the volume's spacing"
            )
        direction = m[:3, :3] / spacing
        return cls(
            tuple(int(s) for s in size),
            tuple(float(s) for s in spacing),
            tuple(float(o) for o in m[:3, 3]),
            tuple(float(d) for d in direction.ravel()),
        )

    @classmethod
    def from_ijk_to_ras(cls, matrix: np.ndarray, size: tuple[int, int, int]) -> Geometry:
        return cls.from_ijk_to_lps(LPS_TO_RAS @ np.asarray(matrix, dtype=float), size)

    @classmethod
    def from_sitk(cls, image) -> Geometry:
        return cls(
            tuple(int(s) for s in image.GetSize()),
            tuple(float(s) for s in image.GetSpacing()),
            tuple(float(o) for o in image.GetOrigin()),
            tuple(float(d) for d in image.GetDirection()),
        )

    def to_sitk(self, array: np.ndarray):
        """A SimpleITK image of ``array`` on this grid."""
        import SimpleITK as sitk

        if tuple(array.shape) != self.shape:
            raise InputError(
                f"array shape {array.shape} does not match the grid {self.shape} (k, j, i)"
            )
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def differences(self, other: Geometry) -> list[str]:
        """What differs between two grids, with how much, or an empty list."""
        out = []
        if tuple(self.size) != tuple(other.size):
            out.append(f"size {tuple(other.size)} vs {tuple(self.size)}")
        sp_a, sp_b = np.asarray(self.spacing), np.asarray(other.spacing)
        rel = np.abs(sp_a - sp_b) / np.maximum(np.abs(sp_a), 1e-12)
        if np.any(rel > _GRID_TOL):
            out.append(f"spacing {tuple(np.round(sp_b, 6))} vs {tuple(np.round(sp_a, 6))}")
        o_a, o_b = np.asarray(self.origin), np.asarray(other.origin)
        scale = max(float(np.max(np.abs(o_a))), float(np.max(sp_a)), 1.0)
        if np.max(np.abs(o_a - o_b)) / scale > _GRID_TOL:
            shift = float(np.max(np.abs(o_a - o_b)))
            out.append(
                f"origin {tuple(np.round(o_b, 4))} vs {tuple(np.round(o_a, 4))} ({shift:.4g} mm apart)"
            )
        d = float(np.max(np.abs(self.direction_matrix - other.direction_matrix)))
        if d > _GRID_TOL:
            out.append(f"direction differs by up to {d:.3g}")
        return out


@dataclass
class Volume:
    array: np.ndarray
    geometry: Geometry
    modality: str | None = None
    path: str | None = None


@dataclass
class LabelMap:
    array: np.ndarray  # uint8, (k, j, i)
    geometry: Geometry
    names: dict[int, str] = field(default_factory=dict)
    colors: dict[int, tuple[float, float, float]] = field(default_factory=dict)


# ---------------------------------------------------------------- reading


def _read_sitk(path: str | os.PathLike, what: str):
    import SimpleITK as sitk

    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} {p} does not exist: check the path")
    modality = None
    try:
        if p.is_dir():
            reader = sitk.ImageSeriesReader()
            ids = reader.GetGDCMSeriesIDs(str(p))
            if not ids:
                raise InputError(
                    f"{what} folder {p} holds no DICOM series: give a DICOM folder or an image file"
                )
            files = max((reader.GetGDCMSeriesFileNames(str(p), sid) for sid in ids), key=len)
            reader.SetFileNames(files)
            reader.MetaDataDictionaryArrayUpdateOn()
            image = reader.Execute()
            if reader.HasMetaDataKey(0, "0008|0060"):
                modality = reader.GetMetaData(0, "0008|0060").strip().upper() or None
        else:
            image = sitk.ReadImage(str(p))
            if image.HasMetaDataKey("0008|0060"):
                modality = image.GetMetaData("0008|0060").strip().upper() or None
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next(
            (ln.strip() for ln in first if ln.strip() and "ITK ERROR" in ln),
            first[-1] if first else "",
        )
        raise InputError(f"cannot read {what} {p}: not a readable image ({detail[:160]})") from None
    dim = image.GetDimension()
    if dim != 3:
        size = " x ".join(str(s) for s in image.GetSize())
        raise InputError(f"{what} {p} is {dim}D ({size}); oflsam2 needs one 3D volume")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{what} {p} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "give a scalar (grey-value) volume"
        )
    if min(image.GetSize()) < 1:
        raise InputError(f"{what} {p} is empty")
    return image, modality


def read_image(path: str | os.PathLike) -> Volume:
    """Read a 3D scalar image (any SimpleITK format or a DICOM series folder)."""
    import SimpleITK as sitk

    image, modality = _read_sitk(path, "image")
    return Volume(sitk.GetArrayFromImage(image), Geometry.from_sitk(image), modality, str(path))


def check_same_grid(reference: Geometry, other: Geometry, what: str = "label map") -> None:
    diffs = reference.differences(other)
    if diffs:
        raise InputError(
            f"{what} is not on the image grid: "
            + "; ".join(diffs)
            + " (resample it onto the image first)"
        )


def as_labels(array: np.ndarray, what: str) -> np.ndarray:
    """The label array as uint8, or one clear error for non-integer or out-of-range values."""
    if array.dtype.kind == "f" and (
        not np.all(np.isfinite(array)) or np.any(array != np.round(array))
    ):
        raise InputError(
            f"{what} holds non-integer values: give a label map (0 = background, 1..255)"
        )
    if array.size and (array.min() < 0 or array.max() > 255):
        raise InputError(
            f"{what} holds label values outside 0..255 (min {array.min()}, max {array.max()}): "
            "use values 1..255 for segments"
        )
    return array.astype(np.uint8, copy=False)


def read_labels(path: str | os.PathLike, reference: Geometry | None = None) -> LabelMap:
    """Read a label map (image file or ``.seg.nrrd``); checked against ``reference`` when given."""
    p = str(path)
    if p.lower().endswith(SEG_SUFFIX):
        labels = _read_seg_nrrd(p)
    else:
        import SimpleITK as sitk

        image, _ = _read_sitk(p, "label map")
        labels = LabelMap(
            as_labels(sitk.GetArrayFromImage(image), f"label map {p}"), Geometry.from_sitk(image)
        )
    if reference is not None:
        labels = _pad_to_grid(labels, reference, p)
        check_same_grid(reference, labels.geometry, f"label map {p}")
    return labels


def _read_seg_nrrd(path: str) -> LabelMap:
    import slicerio

    if not Path(path).exists():
        raise InputError(f"label map {path} does not exist: check the path")
    try:
        seg = slicerio.read_segmentation(path)
    except Exception as exc:  # slicerio raises many kinds on corrupt files
        raise InputError(f"cannot read segmentation {path}: {first_line(exc)}") from None
    vox = np.asarray(seg["voxels"])
    size = vox.shape[-3:]
    out = np.zeros(tuple(reversed(size)), np.uint8)
    names, colors = {}, {}
    segments = seg.get("segments", [])
    used = {int(s["labelValue"]) for s in segments if s.get("layer", 0) == 0}
    free = (v for v in range(1, 256) if v not in used)
    for segment in segments:
        layer = int(segment.get("layer", 0))
        layer_vox = vox[layer] if vox.ndim == 4 else vox
        mask = (layer_vox == segment["labelValue"]).transpose(2, 1, 0)
        value = int(segment["labelValue"]) if layer == 0 else next(free, None)
        if value is None or not 0 < value <= 255:
            raise InputError(
                f"segmentation {path} needs label values above 255; oflsam2 handles 1..255"
            )
        out[mask & (out == 0)] = value
        names[value] = segment.get("name", segment.get("id", f"Segment_{value}"))
        if "color" in segment:
            colors[value] = tuple(float(c) for c in segment["color"])
    geometry = Geometry.from_ijk_to_lps(seg["ijkToLPS"], size)
    return LabelMap(out, geometry, names, colors)


def _pad_to_grid(labels: LabelMap, reference: Geometry, path: str) -> LabelMap:
    """A label map on a cropped piece of the same lattice (Slicer crops .seg.nrrd) is padded exactly."""
    g = labels.geometry
    if g.size == reference.size or g.differences(reference) == []:
        return labels
    same_lattice = not any(d.startswith(("spacing", "direction")) for d in reference.differences(g))
    if not same_lattice:
        return labels
    offset = np.linalg.solve(
        reference.ijk_to_lps()[:3, :3], np.asarray(g.origin) - np.asarray(reference.origin)
    )
    rounded = np.round(offset)
    if np.max(np.abs(offset - rounded)) > 1e-3:
        return labels
    lo = rounded.astype(int)
    hi = lo + np.asarray(g.size)
    if np.any(lo < 0) or np.any(hi > np.asarray(reference.size)):
        # Parts outside the image: keep only what is empty outside, else let the check complain.
        return labels
    out = np.zeros(reference.shape, np.uint8)
    out[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] = labels.array
    return LabelMap(out, reference, labels.names, labels.colors)


# ---------------------------------------------------------------- annotation


@dataclass
class Annotation:
    axis: int  # array axis (0 = k, 1 = j, 2 = i)
    slices: list[int]  # annotated slice indices along ``axis``
    per_segment: dict[int, list[int]]  # label value -> slices holding it
    explicit: bool = False  # slices named by the user (they may be empty)


def slices_with_labels(labels: np.ndarray, axis: int) -> np.ndarray:
    """Indices of the slices along ``axis`` that hold any non-zero voxel."""
    other = tuple(a for a in range(3) if a != axis)
    return np.flatnonzero(np.any(labels != 0, axis=other))


def choose_axis(labels: np.ndarray) -> int:
    """The axis along which the annotation occupies the fewest slices (ties: lowest axis)."""
    counts = [len(slices_with_labels(labels, a)) for a in range(3)]
    if max(counts) == 0:
        raise InputError("the label map is empty: paint the structure on at least one slice")
    return int(np.argmin(counts))


def find_annotated(
    labels: np.ndarray, axis: int | str = "auto", slices: list[int] | None = None
) -> Annotation:
    if labels.ndim != 3:
        raise InputError(f"label map must be 3D, got shape {labels.shape}")
    if axis == "auto":
        axis = 0 if slices is not None else choose_axis(labels)
    axis = int(axis)
    if axis not in (0, 1, 2):
        raise InputError(f"slice axis must be auto, 0, 1 or 2, not {axis}")
    n = labels.shape[axis]
    if slices is None:
        chosen = [int(s) for s in slices_with_labels(labels, axis)]
        if not chosen:
            raise InputError("the label map is empty: paint the structure on at least one slice")
        explicit = False
    else:
        chosen = sorted({int(s) for s in slices})
        bad = [s for s in chosen if s < 0 or s >= n]
        if bad:
            raise InputError(f"slice(s) {bad} outside 0..{n - 1} along axis {axis}")
        if not chosen:
            raise InputError("no annotated slice given")
        explicit = True
        other = set(int(s) for s in slices_with_labels(labels, axis)) - set(chosen)
        if other:
            raise InputError(
                f"labels on slice(s) {sorted(other)[:10]} along axis {axis} are not in --slices: "
                "name them too or clear them"
            )
    per_segment: dict[int, list[int]] = {}
    for value in np.unique(labels):
        if value == 0:
            continue
        per_segment[int(value)] = [int(s) for s in slices_with_labels(labels == value, axis)]
    if not per_segment:
        raise InputError("the label map is empty: paint the structure on at least one slice")
    return Annotation(axis, chosen, per_segment, explicit)


# ---------------------------------------------------------------- intensity

CT_SOFT_TISSUE = (-160.0, 240.0)
CT_LUNG = (-1000.0, 200.0)


def looks_like_ct(array: np.ndarray, modality: str | None = None) -> bool:
    if modality:
        return modality.upper() == "CT"
    lo, hi = float(array.min()), float(array.max())
    return lo <= -900 and hi >= 200 and lo >= -4096


def intensity_window(
    array: np.ndarray, modality: str | None = None, mask: np.ndarray | None = None
) -> tuple[float, float]:
    """The one intensity window every backbone uses.

    CT: a soft-tissue window, or a lung window when the painted voxels are mostly air.
    Anything else: the 0.5 to 99.5 percentile of the volume.
    """
    if looks_like_ct(array, modality):
        if mask is not None and np.any(mask) and float(np.median(array[mask])) < -400:
            return CT_LUNG
        return CT_SOFT_TISSUE
    step = max(1, array.size // 2_000_000)
    sample = array.ravel()[::step]
    lo, hi = np.percentile(sample, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def apply_window(array: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    out = (array.astype(np.float32) - lo) / float(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


# ---------------------------------------------------------------- writing


def write_labels(
    path: str | os.PathLike,
    array: np.ndarray,
    geometry: Geometry,
    names: dict[int, str] | None = None,
    colors: dict[int, tuple[float, float, float]] | None = None,
) -> None:
    """Write a label map on ``geometry`` atomically (temporary file, then rename)."""
    path = Path(path)
    if not path.parent.exists():
        raise InputError(f"output folder {path.parent} does not exist: create it first")
    if path.is_dir():
        raise InputError(f"output {path} is a folder: give a file name such as result.nrrd")
    labels = as_labels(np.asarray(array), "output")
    try:
        with atomic_path(path) as tmp:
            if str(path).lower().endswith(SEG_SUFFIX):
                _write_seg_nrrd(tmp, labels, geometry, names or {}, colors or {})
            else:
                import SimpleITK as sitk

                sitk.WriteImage(geometry.to_sitk(labels), str(tmp), useCompression=True)
    except OSError as exc:  # a folder not writable, a full disk
        raise InputError(f"cannot write {path}: {exc.strerror or first_line(exc)}") from None
    except RuntimeError as exc:
        # SimpleITK's last line names the cause; its first is where in ITK it was raised.
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise InputError(f"cannot write {path}: {lines[-1].strip()[:160]}") from None


def _write_seg_nrrd(path: Path, labels: np.ndarray, geometry: Geometry, names, colors) -> None:
    import slicerio

    seg = slicerio.create_segmentation(geometry.size, geometry.ijk_to_lps())
    seg["voxels"] = np.ascontiguousarray(labels.transpose(2, 1, 0))
    values = sorted(set(int(v) for v in np.unique(labels) if v) | set(names))
    for value in values:
        segment = {
            "id": f"Segment_{value}",
            "name": names.get(value, f"Segment_{value}"),
            "labelValue": value,
            "layer": 0,
        }
        if value in colors:
            segment["color"] = list(colors[value])
        seg["segments"].append(segment)
    slicerio.write_segmentation(str(path), seg)
