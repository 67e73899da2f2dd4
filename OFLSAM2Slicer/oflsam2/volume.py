"""Volumes with exact geometry: reading, writing, grid checks, annotated slices, windows.

Arrays are numpy arrays in (k, j, i) order (SimpleITK's order). Geometry is never
guessed from shapes: it travels beside every array as a :class:`Geometry`.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
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
        with np.errstate(all="ignore"):
            spacing = np.linalg.norm(m[:3, :3], axis=0)
        if not (np.all(np.isfinite(m)) and np.all(np.isfinite(spacing))):
            raise InputError("the IJK-to-physical matrix holds NaN or infinite values")
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
        if not np.all(rel <= _GRID_TOL):  # NaN differs too
            out.append(f"spacing {_numbers(sp_b)} vs {_numbers(sp_a)}")
        o_a, o_b = np.asarray(self.origin), np.asarray(other.origin)
        scale = max(float(np.max(np.abs(o_a))), float(np.max(sp_a)), 1.0)
        if not np.max(np.abs(o_a - o_b)) / scale <= _GRID_TOL:
            shift = float(np.max(np.abs(o_a - o_b)))
            out.append(f"origin {_numbers(o_b)} vs {_numbers(o_a)} ({shift:.4g} mm apart)")
        d = float(np.max(np.abs(self.direction_matrix - other.direction_matrix)))
        if not d <= _GRID_TOL:
            out.append(f"direction differs by up to {d:.3g}")
        return out

    def problem(self) -> str | None:
        """What makes this grid unusable (NaN, infinite or zero sizes, a flat direction
        matrix, corners beyond floating point), or None."""
        with np.errstate(all="ignore"):
            m = self.ijk_to_lps()
            corner = m @ np.array([*self.size, 1.0])
        if not (np.all(np.isfinite(m)) and np.all(np.isfinite(corner))):
            return "its spacing, origin or direction holds NaN or infinite values"
        if min(self.spacing) <= 0:
            return f"its spacing {_numbers(self.spacing)} is not positive"
        if abs(float(np.linalg.det(self.direction_matrix))) < 1e-6:
            return "its direction matrix is singular"
        return None


def _numbers(values) -> str:
    """Plain numbers for messages: (0.7, 0.9, 2.5), never np.float64(0.7)."""
    return "(" + ", ".join(format(float(v), ".6g") for v in values) + ")"


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


_NRRD_LINE = re.compile(r"^\[nrrd\]\s*\w+:\s*")
_ITK_ERROR = re.compile(r"(?:ITK ERROR|itk::ERROR|sitk::ERROR|ERROR):\s*(.*)")
_ITK_OBJECT = re.compile(r"^\w+\(0x[0-9a-fA-F]+\):\s*")
_ITK_METHOD = re.compile(r"^(?:ReadImageInformation|Read|Write|WriteImageInformation):\s*")
_FREAD = re.compile(r"fread got only (\d+) \d+-sized things, not (\d+) \(([\d.]+)% of expected\)")


def itk_reason(exc: BaseException) -> str:
    """ITK's own reason for a failed read or write, in one line without source locations.

    NRRD errors end with teem's chain of ``[nrrd] function: text`` lines: the last one
    that says more than "trouble" is the cause ("axis 2 size is zero!"). Other errors
    carry one ``ITK ERROR: Object(0x...): text`` line.
    """
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    teem = [_NRRD_LINE.sub("", ln) for ln in lines if ln.startswith("[nrrd]")]
    teem = [t for t in teem if t and not t.startswith("trouble")]
    if teem:
        reason = teem[-1]
    else:
        found = [m.group(1) for m in map(_ITK_ERROR.search, lines) if m]
        reason = found[0] if found else (lines[-1] if lines else type(exc).__name__)
        reason = _ITK_METHOD.sub("", _ITK_OBJECT.sub("", reason.strip()))
    fread = _FREAD.search(reason)
    if fread:
        got, want, pct = int(fread.group(1)), int(fread.group(2)), float(fread.group(3))
        reason = (
            f"the file holds {pct:.3g} % of the expected data ({got} of {want} values): "
            "it is truncated or its header is wrong"
        )
    elif reason.startswith("Unable to determine ImageIO reader"):
        reason = "not a readable image (no image reader recognises its format)"
    return reason[:200].rstrip()


@contextlib.contextmanager
def _itk_warnings_off():
    """Silence ITK's own warnings on stderr (GDCM's "No Series were found" and the like)."""
    import SimpleITK as sitk

    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(before)


def available_memory() -> int | None:
    """Bytes of memory free for a new allocation (Linux: MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def human_bytes(n: float) -> str:
    """'1.5 GiB' for messages."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} EiB"  # pragma: no cover - the loop returns


def check_header(
    dim: int, size, components: int, pixel: str, path: Path, what: str, *, memory: bool = True
) -> None:
    """Refuse, from the header alone, what oflsam2 cannot use or (with ``memory``) what this
    machine cannot hold, before anything is allocated.

    ``pixel`` is SimpleITK's name of the voxel type ("16-bit signed integer").
    """
    size = tuple(int(s) for s in size)
    shown = " x ".join(str(s) for s in size)
    if dim != 3:
        raise InputError(f"{what} {path} is {dim}D ({shown}); oflsam2 needs one 3D volume")
    if "complex" in pixel:
        raise InputError(
            f"{what} {path} has complex voxels ({pixel}): give a real-valued (grey-value) "
            "volume, such as the magnitude image"
        )
    if components != 1:
        raise InputError(
            f"{what} {path} has {components} components per voxel; give a scalar (grey-value) volume"
        )
    if min(size) < 1:
        raise InputError(f"{what} {path} is empty ({shown} voxels)")
    if memory:
        bits = re.search(r"(\d+)-bit", pixel)
        check_allocation(
            size, components * (int(bits.group(1)) // 8 if bits else 8), pixel, path, what
        )


def check_allocation(size, voxel_bytes: int, pixel: str, path: Path, what: str) -> None:
    """Refuse a file whose header asks for more memory than this machine can spare."""
    shown = " x ".join(str(int(s)) for s in size)
    need = math.prod(int(s) for s in size) * voxel_bytes
    free = available_memory()
    if free is not None and need > free / 2:  # the work that follows needs as much again
        raise InputError(
            f"{what} {path} is {shown} voxels of {pixel} by its header: {human_bytes(need)} to load, "
            f"more than half the {human_bytes(free)} of memory free; crop or downsample it, or fix its header"
        )


def _read_file(p: Path, what: str):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    reader.ReadImageInformation()
    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    check_header(
        reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents(), pixel, p, what
    )
    image = reader.Execute()
    modality = None
    if image.HasMetaDataKey("0008|0060"):
        modality = image.GetMetaData("0008|0060").strip().upper() or None
    return image, modality


def _read_dicom_folder(p: Path, what: str):
    import SimpleITK as sitk

    if not any(p.iterdir()):
        raise InputError(f"{what} folder {p} is empty: give a DICOM folder or an image file")
    reader = sitk.ImageSeriesReader()
    with _itk_warnings_off():
        ids = reader.GetGDCMSeriesIDs(str(p))
    if not ids:
        raise InputError(
            f"{what} folder {p} holds no DICOM series: give a DICOM folder or an image file"
        )
    files = max((reader.GetGDCMSeriesFileNames(str(p), sid) for sid in ids), key=len)
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    modality = None
    if reader.HasMetaDataKey(0, "0008|0060"):
        modality = reader.GetMetaData(0, "0008|0060").strip().upper() or None
    return image, modality


@contextlib.contextmanager
def _native_stderr(captured: list[str]):
    """Keep what C and C++ libraries print on stderr during a read (niftilib's "** ERROR",
    VNL's matrices, ITK's warnings) out of the terminal; it is appended to ``captured``."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all
        yield
        return
    with tempfile.TemporaryFile() as sink, _itk_warnings_off():
        sys.stderr.flush()
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read(20_000).decode("utf-8", "replace"))


def _native_reason(captured: list[str]) -> str:
    """The last error a C library printed ("** ERROR: nifti_...: bad dim[0]" -> "bad dim[0]")."""
    errors = [ln for text in captured for ln in text.splitlines() if "ERROR" in ln]
    if not errors:
        return ""
    return re.sub(r"^[*\s]*ERROR:\s*(\w+:\s*)?", "", errors[-1].strip())[:120]


def _read_sitk(path: str | os.PathLike, what: str):
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} {p} does not exist: check the path")
    captured: list[str] = []
    try:
        with _native_stderr(captured):
            if p.is_dir():
                image, modality = _read_dicom_folder(p, what)
            else:
                image, modality = _read_file(p, what)
    except RuntimeError as exc:
        reason = itk_reason(exc).replace(str(p), "the file")
        native = _native_reason(captured)
        raise InputError(
            f"cannot read {what} {p}: {reason}" + (f" ({native})" if native else "")
        ) from None
    except OSError as exc:  # a folder that cannot be listed, a file that cannot be opened
        raise InputError(f"cannot read {what} {p}: {exc.strerror or first_line(exc)}") from None
    pixel = image.GetPixelIDTypeAsString()
    size, components = image.GetSize(), image.GetNumberOfComponentsPerPixel()
    check_header(image.GetDimension(), size, components, pixel, p, what, memory=False)
    problem = Geometry.from_sitk(image).problem()
    if problem:
        raise InputError(f"{what} {p} has an unusable grid: {problem}; fix its header")
    return image, modality


def read_image(path: str | os.PathLike) -> Volume:
    """Read a 3D scalar image (any SimpleITK format or a DICOM series folder)."""
    import SimpleITK as sitk

    image, modality = _read_sitk(path, "image")
    array = sitk.GetArrayFromImage(image)
    check_finite(array, f"image {path}")
    return Volume(array, Geometry.from_sitk(image), modality, str(path))


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_finite(array: np.ndarray, what: str) -> None:
    """Refuse NaN and infinite voxels, and values beyond float32 (oflsam2 computes in float32),
    with their count: they would silently spoil the intensity window and the result."""
    if array.dtype.kind not in "fc" or not array.size:
        return
    bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    if bad:
        raise InputError(
            f"{what} has {bad:,} non-finite voxels (NaN or infinite) of {array.size:,}: "
            "replace them with a real value (such as the background's) first"
        )
    if array.dtype.itemsize > 4:
        peak = float(np.max(np.abs(array)))
        if peak > _FLOAT32_MAX:
            raise InputError(
                f"{what} holds values up to {peak:.3g}, beyond the float32 range oflsam2 "
                "computes in: rescale the image first"
            )


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
    if array.dtype.kind == "c":
        raise InputError(f"{what} holds complex values: give a label map (0 = background, 1..255)")
    if array.dtype.kind == "f":
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad:
            raise InputError(
                f"{what} holds {bad:,} non-finite values (NaN or infinite): give a label map "
                "(0 = background, 1..255)"
            )
        if np.any(array != np.round(array)):
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
        import nrrd

        header = nrrd.read_header(path)
        sizes = [int(s) for s in np.atleast_1d(header["sizes"])]
    except Exception as exc:  # pynrrd raises many kinds on corrupt headers
        raise InputError(f"cannot read segmentation {path}: {first_line(exc)}") from None
    # At least a byte per voxel (label maps are mostly uint8): enough to catch absurd sizes.
    check_allocation(sizes, 1, str(header.get("type", "?")), Path(path), "label map")
    try:
        seg = slicerio.read_segmentation(path)
    except Exception as exc:  # slicerio raises many kinds on corrupt files
        raise InputError(f"cannot read segmentation {path}: {first_line(exc)}") from None
    vox = np.asarray(seg["voxels"])
    if vox.ndim not in (3, 4) or min(vox.shape) < 1:
        raise InputError(
            f"segmentation {path} holds a {vox.ndim}D array {vox.shape}, not a 3D volume"
        )
    size = vox.shape[-3:]
    try:
        out, names, colors = _segments_to_labels(vox, seg.get("segments", []), path)
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise InputError(
            f"cannot read segmentation {path}: its segment list is broken ({type(exc).__name__}: "
            f"{first_line(exc, 80)})"
        ) from None
    try:
        geometry = Geometry.from_ijk_to_lps(seg["ijkToLPS"], size)
    except InputError as exc:
        raise InputError(f"segmentation {path} has an unusable grid: {exc}") from None
    problem = geometry.problem()
    if problem:
        raise InputError(f"segmentation {path} has an unusable grid: {problem}; fix its header")
    return LabelMap(out, geometry, names, colors)


def _segments_to_labels(vox: np.ndarray, segments: list, path: str):
    size = vox.shape[-3:]
    out = np.zeros(tuple(reversed(size)), np.uint8)
    names, colors = {}, {}
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
    return out, names, colors


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


_AXIS_NAMES = ("0 (k)", "1 (j)", "2 (i)")


def _fewest_planes(occupied: np.ndarray) -> int:
    """The fewest slices along two axes together that hold every True of ``occupied``.

    ``occupied`` is the label map seen along the third axis (a 2D any()), so each True
    (a, b) is a line of voxels that a slice a along the first axis or a slice b along the
    second covers: the fewest such slices is a minimum vertex cover of a bipartite graph,
    which equals its maximum matching (Konig's theorem).
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching

    graph = csr_matrix(occupied.astype(np.int8))
    return int(np.count_nonzero(maximum_bipartite_matching(graph, perm_type="column") >= 0))


def mixed_axes(labels: np.ndarray) -> tuple[int, int] | None:
    """Two axes whose slices together hold the labels in fewer slices than any one axis
    does (they were painted along both), or None when the labels lie on slices of one axis.

    Slices painted along one axis are held by that many slices of it, and never by fewer
    slices of a mix of axes unless some painted masks are one voxel thin; a stroke painted
    along another axis adds a line of voxels to every slice of the first axis it crosses,
    which a mix of the two axes holds with far fewer slices.
    """
    painted = labels != 0
    counts = [len(slices_with_labels(painted, a)) for a in range(3)]
    fewest = min(counts)
    if fewest <= 1:
        return None
    for a, b in ((0, 1), (0, 2), (1, 2)):
        seen = np.any(painted, axis=3 - a - b)
        if _fewest_planes(seen) < fewest:
            return a, b
    return None


def check_painting(labels: np.ndarray, ann: Annotation, *, one_axis: bool = True) -> None:
    """Refuse labels that leave nothing to propagate, or (``one_axis``) that are painted
    along two axes."""
    n = labels.shape[ann.axis]
    if len(ann.slices) >= n:
        raise InputError(
            f"labels are on all {n} slices along axis {_AXIS_NAMES[ann.axis]}: nothing is left "
            "to propagate; keep only a few painted slices"
        )
    mixed = mixed_axes(labels) if one_axis else None
    if mixed is not None:
        a, b = mixed
        raise InputError(
            f"labels are painted on slices along two axes, {_AXIS_NAMES[a]} and {_AXIS_NAMES[b]}: "
            "paint every segment on slices of one axis, or name it with --axis (each slice "
            "along it that holds labels then counts as painted)"
        )


def _named_slices(labels: np.ndarray, axis: int, slices: list[int]) -> list[int]:
    """The slices named by the user, checked: inside the volume, and every labelled one named."""
    n = labels.shape[axis]
    chosen = sorted({int(s) for s in slices})
    bad = [s for s in chosen if s < 0 or s >= n]
    if bad:
        raise InputError(f"slice(s) {bad[:10]} outside 0..{n - 1} along axis {axis}")
    if not chosen:
        raise InputError("no annotated slice given")
    other = set(int(s) for s in slices_with_labels(labels, axis)) - set(chosen)
    if other:
        raise InputError(
            f"labels on slice(s) {sorted(other)[:10]} along axis {axis} are not in --slices: "
            "name them too or clear them"
        )
    return chosen


def find_annotated(
    labels: np.ndarray,
    axis: int | str = "auto",
    slices: list[int] | None = None,
    *,
    painting: bool = False,
) -> Annotation:
    """The slice axis and the annotated slices of a label map.

    ``axis`` "auto" picks the axis along which the labels occupy the fewest slices.
    With ``painting`` (the command line), labels that leave no slice to propagate are
    refused, and so are labels painted along two axes when the axis is "auto"
    (see :func:`mixed_axes`).
    """
    auto = axis == "auto" and slices is None
    if labels.ndim != 3:
        raise InputError(f"label map must be 3D, got shape {labels.shape}")
    if axis == "auto":
        axis = 0 if slices is not None else choose_axis(labels)
    axis = int(axis)
    if axis not in (0, 1, 2):
        raise InputError(f"slice axis must be auto, 0, 1 or 2, not {axis}")
    if slices is None:
        chosen = [int(s) for s in slices_with_labels(labels, axis)]
        if not chosen:
            raise InputError("the label map is empty: paint the structure on at least one slice")
    else:
        chosen = _named_slices(labels, axis, slices)
    per_segment: dict[int, list[int]] = {}
    for value in np.unique(labels):
        if value == 0:
            continue
        per_segment[int(value)] = [int(s) for s in slices_with_labels(labels == value, axis)]
    if not per_segment:
        raise InputError("the label map is empty: paint the structure on at least one slice")
    ann = Annotation(axis, chosen, per_segment, slices is not None)
    if painting:
        check_painting(labels, ann, one_axis=auto)
    return ann


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
    *,
    into: str | os.PathLike | None = None,
) -> None:
    """Write a label map on ``geometry``; the format follows the name (``.seg.nrrd``: Slicer's).

    Atomically: into a temporary file, then renamed onto ``path``. With ``into``, the
    label map is written into that file instead (a temporary file the caller renames onto
    ``path`` later, see :func:`oflsam2.files.atomic_paths`); messages still name ``path``.
    """
    path = Path(path)
    if not path.parent.exists():
        raise InputError(f"output folder {path.parent} does not exist: create it first")
    if path.is_dir():
        raise InputError(f"output {path} is a folder: give a file name such as result.nrrd")
    labels = as_labels(np.asarray(array), "output")
    captured: list[str] = []
    try:
        with _native_stderr(captured):
            if into is None:
                with atomic_path(path) as tmp:
                    _save_labels(tmp, labels, geometry, names or {}, colors or {})
            else:
                _save_labels(Path(into), labels, geometry, names or {}, colors or {})
    except OSError as exc:  # a folder not writable, a full disk
        raise InputError(f"cannot write {path}: {exc.strerror or first_line(exc)}") from None
    except RuntimeError as exc:
        native = _native_reason(captured)
        reason = itk_reason(exc) + (f" ({native})" if native else "")
        raise InputError(f"cannot write {path}: {reason}") from None


def _save_labels(path: Path, labels: np.ndarray, geometry: Geometry, names, colors) -> None:
    if str(path).lower().endswith(SEG_SUFFIX):
        _write_seg_nrrd(path, labels, geometry, names, colors)
    else:
        import SimpleITK as sitk

        sitk.WriteImage(geometry.to_sitk(labels), str(path), useCompression=True)


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
