"""`oflsam2 segment` end to end on the slicerio CT, and its error paths."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from oflsam2 import cli
from oflsam2 import volume as vol

CT = slicerio.get_testdata_file("CTChest4.nrrd")
SEG = slicerio.get_testdata_file("Segmentation.seg.nrrd")
RIGHT_LUNG = 5


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "oflsam2.cli", *args], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def right_lung_sparse(tmp_path_factory):
    """Right lung painted on 3 axial slices, written next to a copy of nothing else."""
    folder = tmp_path_factory.mktemp("ct")
    image = vol.read_image(CT)
    labels = vol.read_labels(SEG, image.geometry)
    lung = labels.array == RIGHT_LUNG
    sparse = np.zeros_like(labels.array)
    for s in (11, 20, 29):
        sparse[s][lung[s]] = RIGHT_LUNG
    path = folder / "sparse.nrrd"
    vol.write_labels(path, sparse, image.geometry)
    return folder, path, image, sparse


def test_segment_end_to_end_random_init(right_lung_sparse):
    folder, sparse_path, image, sparse = right_lung_sparse
    out = folder / "out.nii.gz"
    report = folder / "report.json"
    proc = run_cli(
        "segment", "--image", CT, "--labels", str(sparse_path), "--output", str(out),
        "--random-init", "--image-size", "512", "--device", "cpu", "--fit-steps", "15",
        "--json", str(report), "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    written = sitk.ReadImage(str(out))
    ref = sitk.ReadImage(CT)
    assert written.GetSize() == ref.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), ref.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(written.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(written.GetDirection(), ref.GetDirection(), atol=1e-6)
    arr = sitk.GetArrayFromImage(written)
    for s in (11, 20, 29):
        np.testing.assert_array_equal(arr[s], sparse[s])
    assert set(np.unique(arr)) <= {0, RIGHT_LUNG}
    rep = json.loads(report.read_text())
    assert rep["random_weights"] is True and "RANDOM WEIGHTS" in rep["weights"]
    assert rep["annotated_slices"] == [11, 20, 29]
    assert rep["slices_encoded"] <= 34
    for stage in ("load", "encode", "fit", "propagate", "write", "total"):
        assert rep["timings_s"][stage] >= 0
    assert rep["voxels_per_segment"][str(RIGHT_LUNG)] == int(np.count_nonzero(arr == RIGHT_LUNG))
    assert rep["device"] == "cpu"


def _err(capsys, argv) -> tuple[int, str]:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def test_no_annotated_slice(tmp_path, capsys):
    image = vol.read_image(CT)
    empty = tmp_path / "empty.nrrd"
    vol.write_labels(empty, np.zeros(image.array.shape, np.uint8), image.geometry)
    code, err = _err(
        capsys,
        [
            "segment",
            "--image",
            CT,
            "--labels",
            str(empty),
            "--output",
            str(tmp_path / "o.nrrd"),
            "--random-init",
        ],
    )
    assert code == 2
    assert "empty" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.nrrd").exists()


def test_label_value_above_255(tmp_path, capsys):
    image = vol.read_image(CT)
    arr = np.zeros(image.array.shape, np.uint16)
    arr[10, 50:60, 50:60] = 300
    path = tmp_path / "big.nrrd"
    sitk.WriteImage(image.geometry.to_sitk(arr), str(path))
    code, err = _err(
        capsys,
        [
            "segment",
            "--image",
            CT,
            "--labels",
            str(path),
            "--output",
            str(tmp_path / "o.nrrd"),
            "--random-init",
        ],
    )
    assert code == 2 and "0..255" in err


def test_labels_on_another_grid(tmp_path, capsys):
    image = vol.read_image(CT)
    arr = np.zeros(image.array.shape, np.uint8)
    arr[10, 50:60, 50:60] = 1
    moved = vol.Geometry(
        image.geometry.size, image.geometry.spacing, (0.0, 0.0, 0.0), image.geometry.direction
    )
    path = tmp_path / "moved.nrrd"
    vol.write_labels(path, arr, moved)
    code, err = _err(
        capsys,
        [
            "segment",
            "--image",
            CT,
            "--labels",
            str(path),
            "--output",
            str(tmp_path / "o.nrrd"),
            "--random-init",
        ],
    )
    assert code == 2 and "not on the image grid" in err and "origin" in err


def test_existing_output_kept_when_input_is_bad(tmp_path, capsys):
    out = tmp_path / "keep.nrrd"
    out.write_bytes(b"user data")
    code, err = _err(
        capsys,
        [
            "segment",
            "--image",
            CT,
            "--labels",
            str(tmp_path / "missing.nrrd"),
            "--output",
            str(out),
            "--random-init",
        ],
    )
    assert code == 2 and "does not exist" in err
    assert out.read_bytes() == b"user data"


def test_output_may_not_be_an_input(right_lung_sparse, capsys):
    _, sparse_path, _, _ = right_lung_sparse
    code, err = _err(
        capsys,
        [
            "segment",
            "--image",
            CT,
            "--labels",
            str(sparse_path),
            "--output",
            str(sparse_path),
            "--random-init",
        ],
    )
    assert code == 2 and "never overwritten" in err


def test_cuda_asked_for_without_gpu(right_lung_sparse, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _, sparse_path, _, _ = right_lung_sparse
    code, err = _err(
        capsys,
        [
            "segment",
            "--image",
            CT,
            "--labels",
            str(sparse_path),
            "--output",
            str(tmp_path / "o.nrrd"),
            "--random-init",
            "--device",
            "cuda",
        ],
    )
    assert code == 2 and "no CUDA GPU" in err


def test_missing_weights_say_how_to_fix(right_lung_sparse, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OFLSAM2_HOME", str(tmp_path / "cache"))
    _, sparse_path, _, _ = right_lung_sparse
    code, err = _err(
        capsys,
        [
            "segment",
            "--image",
            CT,
            "--labels",
            str(sparse_path),
            "--output",
            str(tmp_path / "o.nrrd"),
        ],
    )
    assert code == 2 and "oflsam2 weights download sam2.1_hiera_tiny" in err


def test_corrupt_checkpoint(right_lung_sparse, tmp_path, capsys):
    _, sparse_path, _, _ = right_lung_sparse
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    code, err = _err(
        capsys,
        [
            "segment",
            "--image",
            CT,
            "--labels",
            str(sparse_path),
            "--output",
            str(tmp_path / "o.nrrd"),
            "--checkpoint",
            str(bad),
        ],
    )
    assert code == 2 and "cannot be loaded" in err


def test_too_large_for_memory(right_lung_sparse, tmp_path, capsys, monkeypatch):
    from oflsam2 import cli_segment

    monkeypatch.setattr(cli_segment, "available_memory", lambda: 2**30)
    _, sparse_path, _, _ = right_lung_sparse
    code, err = _err(
        capsys,
        [
            "segment",
            "--image",
            CT,
            "--labels",
            str(sparse_path),
            "--output",
            str(tmp_path / "o.nrrd"),
            "--random-init",
        ],
    )
    assert code == 2 and "--image-size 512" in err


def test_bad_slices_option(right_lung_sparse, tmp_path, capsys):
    _, sparse_path, _, _ = right_lung_sparse
    code, err = _err(
        capsys,
        [
            "segment",
            "--image",
            CT,
            "--labels",
            str(sparse_path),
            "--output",
            str(tmp_path / "o.nrrd"),
            "--random-init",
            "--slices",
            "a,b",
        ],
    )
    assert code == 2 and "--slices" in err
    code, err = _err(
        capsys,
        [
            "segment",
            "--image",
            CT,
            "--labels",
            str(sparse_path),
            "--output",
            str(tmp_path / "o.nrrd"),
            "--random-init",
            "--slices",
            "11,20",
        ],
    )
    assert code == 2 and "not in --slices" in err


# Floor from bench/accuracy.py (right lung, K = 3 at slices 11, 20, 29): oflsam2 with LiteMedSAM
# reached 0.945 on the unpainted slices where Fill between slices reaches 0.843.
LITEMEDSAM_RIGHT_LUNG_FLOOR = 0.90


def test_segment_litemedsam_quality_floor(right_lung_sparse):
    from oflsam2.metrics import dice

    folder, sparse_path, image, sparse = right_lung_sparse
    out = folder / "lite.nrrd"
    proc = run_cli(
        "segment", "--image", CT, "--labels", str(sparse_path), "--output", str(out),
        "--backbone", "litemedsam", "--device", "cpu", "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    truth = vol.read_labels(SEG, image.geometry).array == RIGHT_LUNG
    unpainted = [s for s in range(arr.shape[0]) if s not in (11, 20, 29)]
    assert dice(arr[unpainted] == RIGHT_LUNG, truth[unpainted]) > LITEMEDSAM_RIGHT_LUNG_FLOOR
