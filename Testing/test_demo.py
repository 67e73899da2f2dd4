"""`oflsam2 demo` end to end: the README's main command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import RIGHT_LUNG, RIGHT_LUNG_LITEMEDSAM_FLOOR
from PIL import Image

from oflsam2 import volume as vol


@pytest.mark.slow
@pytest.mark.engine
def test_demo_writes_everything(tmp_path, right_lung):
    env_home = tmp_path / "cache"  # no SAM2 checkpoint: the demo must pick LiteMedSAM and say why
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "oflsam2.cli", "demo", "--output", str(out), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OFLSAM2_HOME": str(env_home)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LiteMedSAM" in proc.stderr and "no SAM2 checkpoint" in proc.stderr
    for name in ("sparse.nrrd", "result.nrrd", "result.seg.nrrd", "report.json", "overview.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["backbone"] == "litemedsam"
    assert report["segment"] == "right lung"
    assert report["painted_slices"] == list(right_lung.slices)  # the tests' own choice
    assert report["dice_unpainted_oflsam2"] > RIGHT_LUNG_LITEMEDSAM_FLOOR
    assert report["dice_unpainted_fill_between_slices"] is not None
    with Image.open(out / "overview.png") as im:
        im.verify()
    with Image.open(out / "overview.png") as im:
        assert im.size == (1200, 660)
    result = sitk.ReadImage(str(out / "result.nrrd"))
    assert result.GetSize() == (128, 128, 34)
    seg = vol.read_labels(out / "result.seg.nrrd")
    assert seg.names == {RIGHT_LUNG: "right lung"}
    sparse = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "sparse.nrrd")))
    arr = sitk.GetArrayFromImage(result)
    for s in report["painted_slices"]:
        np.testing.assert_array_equal(arr[s], sparse[s])
    assert "Dice on unpainted slices" in proc.stdout


def test_demo_unknown_segment(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "oflsam2.cli",
            "demo",
            "--output",
            str(tmp_path),
            "--segment",
            "spleen",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "no segment 'spleen'" in proc.stderr and "right lung" in proc.stderr
