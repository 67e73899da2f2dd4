"""`oflsam2 segment` end to end on the slicerio CT, and its error paths."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import CT_PATH, RIGHT_LUNG, RIGHT_LUNG_LITEMEDSAM_FLOOR

from oflsam2 import cli
from oflsam2 import volume as vol
from oflsam2.metrics import dice

RANDOM_SAM2 = ("--backbone", "sam2", "--random-init")  # mechanics only, no weights needed


def segment_argv(labels, output, *options: str, image=CT_PATH) -> list[str]:
    """``oflsam2 segment`` arguments: the sample CT (or ``image``), ``labels``, ``output``, options."""
    return [
        "segment", "--image", str(image), "--labels", str(labels), "--output", str(output),
        *options,
    ]  # fmt: skip


def run_cli(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "oflsam2.cli", *argv], capture_output=True, text=True, timeout=1800
    )


@pytest.fixture(scope="module")
def right_lung_file(tmp_path_factory, sample_ct, right_lung):
    """The painted right lung written as a label map on the CT's grid."""
    path = tmp_path_factory.mktemp("ct") / "sparse.nrrd"
    vol.write_labels(path, right_lung.sparse, sample_ct.geometry)
    return path


@pytest.mark.slow
@pytest.mark.engine
def test_segment_end_to_end_random_init(right_lung_file, right_lung, tmp_path):
    sparse_path = right_lung_file
    out = tmp_path / "out.nii.gz"
    report = tmp_path / "report.json"
    options = ("--image-size", "512", "--device", "cpu", "--fit-steps", "15")
    proc = run_cli(segment_argv(sparse_path, out, *RANDOM_SAM2, *options, "--json", str(report)))
    assert proc.returncode == 0, proc.stderr
    # stderr is a pipe, not a terminal: progress comes as a few whole lines, no bar frames
    assert "\r" not in proc.stderr
    progress = [line for line in proc.stderr.splitlines() if line.startswith("oflsam2: ")]
    assert any(line.endswith("started (15 steps)") for line in progress), proc.stderr
    assert len(progress) < 30, proc.stderr
    assert "paint slice" in proc.stderr
    written = sitk.ReadImage(str(out))
    ref = sitk.ReadImage(CT_PATH)
    assert written.GetSize() == ref.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), ref.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(written.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(written.GetDirection(), ref.GetDirection(), atol=1e-6)
    arr = sitk.GetArrayFromImage(written)
    for s in right_lung.slices:
        np.testing.assert_array_equal(arr[s], right_lung.sparse[s])
    assert set(np.unique(arr)) <= {0, RIGHT_LUNG}
    rep = json.loads(report.read_text())
    assert rep["random_weights"] is True and "RANDOM WEIGHTS" in rep["weights"]
    assert rep["annotated_slices"] == list(right_lung.slices)
    assert rep["slices_encoded"] <= 34
    for stage in ("load", "encode", "fit", "propagate", "write", "total"):
        assert rep["timings_s"][stage] >= 0
    assert rep["voxels_per_segment"][str(RIGHT_LUNG)] == int(np.count_nonzero(arr == RIGHT_LUNG))
    assert rep["device"] == "cpu"
    suggested = rep["suggested_slices"]
    assert 1 <= len(suggested) <= 3
    assert all(s["slice"] not in right_lung.slices and 0 < s["score"] <= 1 for s in suggested)
    assert len(rep["slice_confidence"]) == 34


def test_next_slice_line():
    from oflsam2.cli_segment import next_slice_text

    labels = np.zeros((21, 8, 8), np.uint8)
    labels[:, 2:6, 2:6] = 1
    result = SimpleNamespace(
        labels=labels, axis=0, annotated=[5, 15], confidence=np.full(21, 0.8), disagreement=None
    )
    assert next_slice_text(result).startswith("paint slice 10 next (axis 0)")
    result.labels = np.zeros_like(labels)
    assert next_slice_text(result).startswith("no slice to suggest")


def _err(capsys, argv) -> tuple[int, str]:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def test_no_annotated_slice(tmp_path, capsys, sample_ct):
    empty = tmp_path / "empty.nrrd"
    vol.write_labels(empty, np.zeros(sample_ct.array.shape, np.uint8), sample_ct.geometry)
    code, err = _err(capsys, segment_argv(empty, tmp_path / "o.nrrd", *RANDOM_SAM2))
    assert code == 2
    assert "empty" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.nrrd").exists()


def test_label_value_above_255(tmp_path, capsys, sample_ct):
    arr = np.zeros(sample_ct.array.shape, np.uint16)
    arr[10, 50:60, 50:60] = 300
    path = tmp_path / "big.nrrd"
    sitk.WriteImage(sample_ct.geometry.to_sitk(arr), str(path))
    code, err = _err(capsys, segment_argv(path, tmp_path / "o.nrrd", *RANDOM_SAM2))
    assert code == 2 and "0..255" in err


def test_labels_on_another_grid(tmp_path, capsys, sample_ct):
    arr = np.zeros(sample_ct.array.shape, np.uint8)
    arr[10, 50:60, 50:60] = 1
    g = sample_ct.geometry
    moved = vol.Geometry(g.size, g.spacing, (0.0, 0.0, 0.0), g.direction)
    path = tmp_path / "moved.nrrd"
    vol.write_labels(path, arr, moved)
    code, err = _err(capsys, segment_argv(path, tmp_path / "o.nrrd", *RANDOM_SAM2))
    assert code == 2 and "not on the image grid" in err and "origin" in err


def test_existing_output_kept_when_input_is_bad(tmp_path, capsys):
    out = tmp_path / "keep.nrrd"
    out.write_bytes(b"user data")
    code, err = _err(capsys, segment_argv(tmp_path / "missing.nrrd", out, *RANDOM_SAM2))
    assert code == 2 and "does not exist" in err
    assert out.read_bytes() == b"user data"


def test_output_may_not_be_an_input(right_lung_file, capsys):
    sparse_path = right_lung_file
    code, err = _err(capsys, segment_argv(sparse_path, sparse_path, *RANDOM_SAM2))
    assert code == 2 and "never overwritten" in err


def test_cuda_asked_for_without_gpu(right_lung_file, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    sparse_path = right_lung_file
    argv = segment_argv(sparse_path, tmp_path / "o.nrrd", *RANDOM_SAM2, "--device", "cuda")
    code, err = _err(capsys, argv)
    assert code == 2 and "no CUDA GPU" in err


def test_missing_weights_say_how_to_fix(right_lung_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OFLSAM2_HOME", str(tmp_path / "cache"))
    sparse_path = right_lung_file
    code, err = _err(capsys, segment_argv(sparse_path, tmp_path / "o.nrrd", "--backbone", "sam2"))
    assert code == 2 and "oflsam2 weights download sam2.1_hiera_tiny" in err


def test_corrupt_checkpoint(right_lung_file, tmp_path, capsys):
    sparse_path = right_lung_file
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 100)
    argv = segment_argv(
        sparse_path, tmp_path / "o.nrrd", "--backbone", "sam2", "--checkpoint", str(bad)
    )
    code, err = _err(capsys, argv)
    assert code == 2 and "cannot be loaded" in err


def test_too_large_for_memory(right_lung_file, tmp_path, capsys, monkeypatch):
    from oflsam2 import cli_segment

    monkeypatch.setattr(cli_segment, "available_memory", lambda: 2**30)
    sparse_path = right_lung_file
    code, err = _err(capsys, segment_argv(sparse_path, tmp_path / "o.nrrd", *RANDOM_SAM2))
    assert code == 2 and "--image-size 512" in err


def test_too_large_for_the_temporary_disk(right_lung_file, tmp_path, capsys, monkeypatch):
    """Features beyond --cache-ram-gib go to TMPDIR: refused up front when it is too small."""
    from oflsam2 import cli_segment

    monkeypatch.setattr(cli_segment, "available_memory", lambda: 64 * 2**30)
    monkeypatch.setattr(cli_segment.shutil, "disk_usage", lambda _: SimpleNamespace(free=2**20))
    out = tmp_path / "o.nrrd"
    argv = segment_argv(right_lung_file, out, *RANDOM_SAM2, "--cache-ram-gib", "0")
    code, err = _err(capsys, argv)
    assert code == 2 and "of disk in" in err and "TMPDIR" in err and not out.exists()
    code, err = _err(capsys, segment_argv(right_lung_file, out, "--cache-ram-gib", "-1"))
    assert code == 2 and "--cache-ram-gib must be 0 or more, not -1.0" in err


def test_bad_slices_option(right_lung_file, right_lung, tmp_path, capsys):
    sparse_path = right_lung_file
    out = tmp_path / "o.nrrd"
    code, err = _err(capsys, segment_argv(sparse_path, out, *RANDOM_SAM2, "--slices", "a,b"))
    assert code == 2 and "--slices" in err
    some = ",".join(str(s) for s in right_lung.slices[:-1])  # one painted slice left out
    code, err = _err(capsys, segment_argv(sparse_path, out, *RANDOM_SAM2, "--slices", some))
    assert code == 2 and "not in --slices" in err


@pytest.mark.slow
@pytest.mark.engine
def test_segment_litemedsam_quality_floor(right_lung_file, right_lung, tmp_path):
    sparse_path = right_lung_file
    out = tmp_path / "lite.nrrd"
    argv = segment_argv(sparse_path, out, "--backbone", "litemedsam", "--device", "cpu", "--quiet")
    proc = run_cli(argv)
    assert proc.returncode == 0, proc.stderr
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    unpainted = right_lung.unpainted
    score = dice(arr[unpainted] == RIGHT_LUNG, right_lung.truth[unpainted])
    assert score > RIGHT_LUNG_LITEMEDSAM_FLOOR
