"""oflsam2.volume: exact geometry through every format, grid checks, annotated slices, windows."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from conftest import RIGHT_LUNG, SEG_PATH
from scipy.spatial.transform import Rotation

from oflsam2 import volume
from oflsam2.errors import InputError
from oflsam2.volume import Geometry

SPACING = (0.7, 0.9, 2.5)  # anisotropic
ORIGIN = (-10.5, 20.25, 3.0)
ROT = Rotation.from_rotvec([0.3, -0.2, 0.5]).as_matrix()  # oblique: no axis aligned
OBLIQUE = tuple(float(v) for v in ROT.ravel())
SHAPE = (5, 6, 7)  # (k, j, i)
FORMATS = [".nrrd", ".nii.gz", ".mha"]


def _image_array() -> np.ndarray:
    return (np.arange(np.prod(SHAPE)).reshape(SHAPE) * 7 - 300).astype(np.int16)


def _label_array() -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[1, 2:4, 1:5] = 3
    lab[3, 0:2, 4:7] = 200
    return lab


def _sitk(array: np.ndarray, direction=OBLIQUE) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(direction)
    return img


def _assert_geometry(g: Geometry, size, spacing, origin, direction, tol=1e-4) -> None:
    assert tuple(g.size) == tuple(size)
    np.testing.assert_allclose(g.spacing, spacing, rtol=0, atol=tol)
    np.testing.assert_allclose(g.origin, origin, rtol=0, atol=tol)
    np.testing.assert_allclose(g.direction, direction, rtol=0, atol=tol)


def _tol(suffix: str) -> float:
    return 1e-4 if suffix == ".nii.gz" else 1e-9  # NIfTI stores float32 geometry


# ------------------------------------------------------------------ geometry


def test_geometry_matrices_are_lps_and_ras():
    g = Geometry((7, 6, 5), SPACING, ORIGIN, OBLIQUE)
    img = _sitk(_image_array())
    ijk = (3, 2, 4)
    lps = np.asarray(img.TransformIndexToPhysicalPoint(ijk))
    np.testing.assert_allclose((g.ijk_to_lps() @ [*ijk, 1])[:3], lps, atol=1e-12)
    ras = (g.ijk_to_ras() @ [*ijk, 1])[:3]
    np.testing.assert_allclose(ras, [-lps[0], -lps[1], lps[2]], atol=1e-12)
    back = Geometry.from_ijk_to_ras(g.ijk_to_ras(), g.size)
    _assert_geometry(back, g.size, SPACING, ORIGIN, OBLIQUE, tol=1e-12)
    assert g.shape == SHAPE
    assert Geometry.from_sitk(img) == Geometry((7, 6, 5), SPACING, ORIGIN, OBLIQUE)


def test_geometry_zero_column_rejected():
    m = np.eye(4)
    m[:, 1] = 0
    m[3, 3] = 1
    with pytest.raises(InputError, match="zero column"):
        Geometry.from_ijk_to_lps(m, (2, 2, 2))


def test_to_sitk_wrong_shape():
    g = Geometry((7, 6, 5), SPACING, ORIGIN, OBLIQUE)
    with pytest.raises(InputError, match=r"\(5, 7, 6\) does not match the grid \(5, 6, 7\)"):
        g.to_sitk(np.zeros((5, 7, 6), np.uint8))


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize(
    "direction", [OBLIQUE, (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)], ids=["oblique", "identity"]
)
def test_image_round_trip(tmp_path, suffix, direction):
    arr = _image_array()
    path = tmp_path / f"img{suffix}"
    sitk.WriteImage(_sitk(arr, direction), str(path))
    vol = volume.read_image(path)
    assert vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array, arr)
    _assert_geometry(vol.geometry, (7, 6, 5), SPACING, ORIGIN, direction, _tol(suffix))
    assert vol.path == str(path)


@pytest.mark.parametrize("suffix", [*FORMATS, ".seg.nrrd"])
def test_label_round_trip(tmp_path, suffix):
    lab = _label_array()
    g = Geometry((7, 6, 5), SPACING, ORIGIN, OBLIQUE)
    path = tmp_path / f"lab{suffix}"
    volume.write_labels(path, lab, g, names={3: "liver", 200: "tumour"})
    back = volume.read_labels(path)
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, lab)
    _assert_geometry(back.geometry, (7, 6, 5), SPACING, ORIGIN, OBLIQUE, _tol(suffix))
    if suffix == ".seg.nrrd":
        assert back.names == {3: "liver", 200: "tumour"}
    # and checked against the image grid it was written for
    volume.read_labels(path, reference=g)
    assert _leftovers(tmp_path) == []


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or ".tmp" in p.name]


def _write_dicom_series(folder: Path, arr: np.ndarray, direction, modality: str = "CT") -> None:
    """One int16 file per slice with the tags a scanner writes (position, orientation, thickness)."""
    folder.mkdir()
    vol = _sitk(arr, direction)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = direction
    iop = "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    study = "1.2.826.0.1.3680043.2.1125.1.4242"
    series = study + ".2"
    for k in range(arr.shape[0]):
        sl = sitk.GetImageFromArray(arr[k])
        sl.SetSpacing(SPACING[:2])
        pos = vol.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
            "0008|0018": f"{series}.{k + 1}",
            "0008|0060": modality,
            "0010|0020": "TEST",
            "0018|0050": f"{SPACING[2]:.6f}",  # Slice Thickness
            "0020|000d": study,
            "0020|000e": series,
            "0020|0013": str(k + 1),  # Instance Number
            "0020|0032": "\\".join(f"{v:.10f}" for v in pos),  # Image Position (Patient)
            "0020|0037": iop,  # Image Orientation (Patient)
        }
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)


@pytest.mark.parametrize(
    "direction", [OBLIQUE, (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)], ids=["oblique", "identity"]
)
def test_dicom_series_round_trip(tmp_path, direction):
    arr = _image_array()
    _write_dicom_series(tmp_path / "dicom", arr, direction)
    vol = volume.read_image(tmp_path / "dicom")
    np.testing.assert_array_equal(vol.array, arr)
    _assert_geometry(vol.geometry, (7, 6, 5), SPACING, ORIGIN, direction, 1e-4)
    assert vol.modality == "CT"
    # labels written on the DICOM's grid read back on it
    out = tmp_path / "seg.nrrd"
    volume.write_labels(out, _label_array(), vol.geometry)
    np.testing.assert_array_equal(
        volume.read_labels(out, reference=vol.geometry).array, _label_array()
    )


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="holds no DICOM series"):
        volume.read_image(tmp_path)


def test_modality_from_metadata(tmp_path):
    img = _sitk(_image_array())
    img.SetMetaData("0008|0060", "MR")
    sitk.WriteImage(img, str(tmp_path / "mr.nrrd"))
    assert volume.read_image(tmp_path / "mr.nrrd").modality == "MR"  # kept in the NRRD header
    sitk.WriteImage(_sitk(_image_array()), str(tmp_path / "plain.nrrd"))
    assert volume.read_image(tmp_path / "plain.nrrd").modality is None  # none invented


# ------------------------------------------------------------------ grid checks


def _grid(**changes) -> Geometry:
    base = {"size": (7, 6, 5), "spacing": SPACING, "origin": ORIGIN, "direction": OBLIQUE}
    base.update(changes)
    return Geometry(**base)


@pytest.mark.parametrize(
    "other, words",
    [
        (_grid(size=(7, 6, 6)), ["size (7, 6, 6) vs (7, 6, 5)"]),
        (_grid(spacing=(0.7, 0.9, 3.0)), ["spacing"]),
        (_grid(origin=(-10.5, 20.25, 5.0)), ["origin", "2 mm apart"]),
        (_grid(direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)), ["direction differs"]),
    ],
    ids=["size", "spacing", "origin", "direction"],
)
def test_grid_mismatch_names_what_differs(other, words):
    with pytest.raises(InputError) as exc:
        volume.check_same_grid(_grid(), other, "label map x.nrrd")
    msg = str(exc.value)
    assert msg.startswith("label map x.nrrd is not on the image grid: ")
    assert "resample" in msg and "\n" not in msg
    for word in words:
        assert word in msg
    for name in {"size", "spacing", "origin", "direction"} - {words[0].split()[0]}:
        assert f"{name} " not in msg.split(": ", 1)[1]


def test_grid_within_tolerance_is_same():
    volume.check_same_grid(_grid(), _grid(origin=(-10.5 + 1e-7, 20.25, 3.0)))
    assert _grid().differences(_grid(spacing=(0.7 * (1 + 1e-6), 0.9, 2.5))) == []


def test_read_labels_on_another_grid_fails(tmp_path):
    path = tmp_path / "lab.nrrd"
    sitk.WriteImage(_sitk(_label_array()), str(path))
    ref = _grid(spacing=(0.7, 0.9, 2.0))
    with pytest.raises(InputError, match=r"lab\.nrrd is not on the image grid: spacing"):
        volume.read_labels(path, reference=ref)
    big = np.zeros((6, 6, 7), np.uint8)  # one slice more than the image: not a crop
    sitk.WriteImage(_sitk(big), str(tmp_path / "big.nrrd"))
    with pytest.raises(InputError, match=r"size \(7, 6, 6\) vs \(7, 6, 5\)"):
        volume.read_labels(tmp_path / "big.nrrd", reference=_grid())


def test_cropped_label_map_is_padded_exactly(tmp_path):
    """Slicer saves .seg.nrrd cropped to the painted region: it must land on the right voxels."""
    g = _grid()
    crop = np.zeros((2, 3, 4), np.uint8)
    crop[1, 1, 2] = 9
    img = sitk.GetImageFromArray(crop)
    img.SetSpacing(SPACING)
    img.SetDirection(OBLIQUE)
    img.SetOrigin(
        _sitk(_image_array()).TransformIndexToPhysicalPoint((2, 1, 3))
    )  # (i, j, k) offset
    sitk.WriteImage(img, str(tmp_path / "crop.nrrd"))
    lab = volume.read_labels(tmp_path / "crop.nrrd", reference=g)
    assert lab.array.shape == SHAPE
    assert lab.geometry == g
    assert list(zip(*np.nonzero(lab.array), strict=True)) == [(3 + 1, 1 + 1, 2 + 2)]


# ------------------------------------------------------------------ .seg.nrrd from Slicer


def test_slicer_segmentation_sample(tmp_path, sample_ct, sample_labels):
    ct, lab = sample_ct, sample_labels  # read with volume.read_image and volume.read_labels
    assert ct.array.shape == (34, 128, 128)
    assert lab.names == {
        1: "ribs",
        2: "cervical vertebral column",
        3: "thoracic vertebral column",
        4: "lumbar vertebral column",
        5: "right lung",
        6: "left lung",
        7: "tissue",
    }
    ref = slicerio.read_segmentation(SEG_PATH)
    expected = np.asarray(ref["voxels"]).transpose(2, 1, 0)
    np.testing.assert_array_equal(lab.array, expected)
    assert int((lab.array == RIGHT_LUNG).sum()) == int((expected == RIGHT_LUNG).sum()) > 1000
    np.testing.assert_allclose(lab.colors[RIGHT_LUNG], (0.0862745, 0.772549, 0.278431), atol=1e-6)

    out = tmp_path / "copy.seg.nrrd"
    volume.write_labels(out, lab.array, ct.geometry, lab.names, lab.colors)
    back = volume.read_labels(out, reference=ct.geometry)
    np.testing.assert_array_equal(back.array, lab.array)
    assert back.names == lab.names
    np.testing.assert_allclose(back.colors[RIGHT_LUNG], lab.colors[RIGHT_LUNG], atol=1e-6)
    seg = slicerio.read_segmentation(str(out))
    assert {s["name"]: s["labelValue"] for s in seg["segments"]}["right lung"] == RIGHT_LUNG


# ------------------------------------------------------------------ writing


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    g = _grid()
    path = tmp_path / "out.nrrd"
    volume.write_labels(path, _label_array(), g)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("Exception thrown in SimpleITK WriteImage: disk full")

    monkeypatch.setattr(sitk, "WriteImage", boom)
    with pytest.raises(InputError, match=r"cannot write .*out\.nrrd: .*disk full"):
        volume.write_labels(path, np.ones(SHAPE, np.uint8), g)
    monkeypatch.undo()
    assert path.read_bytes() == before
    with pytest.raises(InputError, match="does not match the grid"):
        volume.write_labels(path, np.ones((5, 6, 8), np.uint8), g)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nrrd"]


def test_write_errors(tmp_path):
    g = _grid()
    with pytest.raises(InputError, match="outside 0..255"):
        volume.write_labels(tmp_path / "a.nrrd", np.full(SHAPE, 300, np.int32), g)
    with pytest.raises(InputError, match="outside 0..255"):
        volume.write_labels(tmp_path / "a.nrrd", np.full(SHAPE, -1, np.int32), g)
    with pytest.raises(InputError, match="non-integer"):
        volume.write_labels(tmp_path / "a.nrrd", np.full(SHAPE, 0.5, np.float32), g)
    with pytest.raises(InputError, match="does not exist"):
        volume.write_labels(tmp_path / "no" / "a.nrrd", np.zeros(SHAPE, np.uint8), g)
    with pytest.raises(InputError, match="is a folder"):
        volume.write_labels(tmp_path, np.zeros(SHAPE, np.uint8), g)
    assert os.listdir(tmp_path) == []


def test_read_labels_above_255_rejected(tmp_path):
    arr = np.zeros(SHAPE, np.uint16)
    arr[2, 2, 2] = 256
    sitk.WriteImage(_sitk(arr), str(tmp_path / "big.nrrd"))
    with pytest.raises(InputError, match=r"outside 0..255 \(min 0, max 256\)"):
        volume.read_labels(tmp_path / "big.nrrd")


# ------------------------------------------------------------------ annotated slices


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_find_annotated_on_each_axis(axis):
    labels = np.zeros((8, 9, 10), np.uint8)
    index = [slice(None)] * 3
    for s, value in ((2, 1), (5, 2), (6, 1)):
        index[axis] = s
        labels[tuple(index)] = value
    assert volume.choose_axis(labels) == axis
    ann = volume.find_annotated(labels)
    assert ann.axis == axis
    assert ann.slices == [2, 5, 6]
    assert ann.per_segment == {1: [2, 6], 2: [5]}
    assert ann.explicit is False


def test_choose_axis_fewest_slices():
    labels = np.zeros((8, 9, 10), np.uint8)
    labels[1:7, 4, 2:9] = 1  # 6 slices on axis 0, 1 on axis 1, 7 on axis 2
    assert volume.choose_axis(labels) == 1
    labels[:] = 0
    labels[3, 3, 3] = 1  # one voxel: one slice on every axis, lowest axis wins
    assert volume.choose_axis(labels) == 0


def test_explicit_slices_may_be_empty():
    labels = np.zeros((8, 9, 10), np.uint8)
    labels[2, 3:5, 3:5] = 1
    labels[6, 3:5, 3:5] = 1
    ann = volume.find_annotated(labels, axis=0, slices=[6, 2, 4, 4])
    assert ann.slices == [2, 4, 6]
    assert ann.explicit is True
    assert ann.per_segment == {1: [2, 6]}
    with pytest.raises(
        InputError, match=r"labels on slice\(s\) \[6\] along axis 0 are not in --slices"
    ):
        volume.find_annotated(labels, axis=0, slices=[2, 4])
    with pytest.raises(InputError, match=r"slice\(s\) \[8\] outside 0..7 along axis 0"):
        volume.find_annotated(labels, axis=0, slices=[2, 6, 8])


def test_empty_labels_rejected():
    with pytest.raises(InputError, match="label map is empty"):
        volume.choose_axis(np.zeros((3, 3, 3), np.uint8))
    with pytest.raises(InputError, match="label map is empty"):
        volume.find_annotated(np.zeros((3, 3, 3), np.uint8))
    with pytest.raises(InputError, match="slice axis must be auto, 0, 1 or 2"):
        volume.find_annotated(np.ones((3, 3, 3), np.uint8), axis=3)


# ------------------------------------------------------------------ intensity windows


def _ct_like() -> np.ndarray:
    arr = np.full((4, 10, 10), 40, np.int16)  # soft tissue
    arr[:, :4, :4] = -1000  # air
    arr[:, 8:, 8:] = 1500  # bone
    return arr


def test_ct_window_soft_tissue_by_default():
    arr = _ct_like()
    assert volume.intensity_window(arr) == volume.CT_SOFT_TISSUE == (-160.0, 240.0)
    mask = np.zeros(arr.shape, bool)
    mask[:, 5:7, 5:7] = True  # painted on soft tissue
    assert volume.intensity_window(arr, mask=mask) == (-160.0, 240.0)
    assert volume.intensity_window(arr, modality="CT") == (-160.0, 240.0)


def test_ct_window_lung_when_painted_voxels_are_air():
    arr = _ct_like()
    mask = np.zeros(arr.shape, bool)
    mask[:, :3, :3] = True
    assert volume.intensity_window(arr, mask=mask) == volume.CT_LUNG == (-1000.0, 200.0)


def test_mr_window_is_percentile():
    arr = np.random.default_rng(1).gamma(2.0, 100.0, size=(6, 20, 20)).astype(np.float32)
    lo, hi = volume.intensity_window(arr, modality="MR")
    e_lo, e_hi = np.percentile(arr, [0.5, 99.5])
    assert lo == pytest.approx(float(e_lo), rel=1e-9)
    assert hi == pytest.approx(float(e_hi), rel=1e-9)
    # a CT-looking range is still MR when the modality says so
    assert volume.intensity_window(_ct_like(), modality="MR") != volume.CT_SOFT_TISSUE
    # and an MR-looking range without modality is not CT
    assert volume.intensity_window(arr) == (lo, hi)


def test_constant_volume_window_is_not_degenerate():
    lo, hi = volume.intensity_window(np.full((2, 3, 3), 7.0), modality="MR")
    assert (lo, hi) == (7.0, 8.0)


def test_apply_window():
    out = volume.apply_window(np.array([-200, -160, 40, 240, 1000], np.int16), (-160.0, 240.0))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("suffix", [".nrrd", ".seg.nrrd"])
def test_written_file_permissions(tmp_path, suffix):
    """Outputs get the usual permissions (umask), not the temporary file's 0600; an overwrite keeps them."""
    g = _grid()
    path = tmp_path / f"out{suffix}"
    volume.write_labels(path, _label_array(), g)
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    path.chmod(0o640)
    volume.write_labels(path, _label_array(), g)
    assert path.stat().st_mode & 0o777 == 0o640
