"""The command line's contract (exit codes, one-line errors) and the image error messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from oflsam2 import __version__, volume
from oflsam2.cli import main
from oflsam2.errors import InputError


def _run(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("oflsam2")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "oflsam2.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


def test_version():
    r = _run("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"oflsam2 {__version__}"


def test_help():
    r = _run("--help")
    assert r.returncode == 0
    assert r.stdout.startswith("usage: oflsam2")
    assert "weights" in r.stdout
    assert r.stderr == ""


def test_unknown_command_exits_2_with_one_line():
    r = _run("frobnicate")
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("oflsam2: error: ")
    assert "frobnicate" in lines[0]
    assert "Traceback" not in r.stderr


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: oflsam2" in capsys.readouterr().out


def test_unknown_option_exits_2(capsys):
    assert main(["weights", "list", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("oflsam2: error: ") and "--bogus" in err


# ------------------------------------------------------------------ image errors


def _error(path) -> str:
    with pytest.raises(InputError) as exc:
        volume.read_image(path)
    msg = str(exc.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    return msg


def test_missing_file(tmp_path):
    msg = _error(tmp_path / "nope.nrrd")
    assert msg == f"image {tmp_path / 'nope.nrrd'} does not exist: check the path"


def test_2d_png(tmp_path):
    path = tmp_path / "slice.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 30), np.uint8)), str(path))
    msg = _error(path)
    assert "is 2D (30 x 20)" in msg and "needs one 3D volume" in msg


def test_2d_nrrd(tmp_path):
    path = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 30), np.int16)), str(path))
    assert "is 2D (30 x 20)" in _error(path)


def test_4d_image(tmp_path):
    path = tmp_path / "series.nrrd"
    sitk.WriteImage(
        sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.int16), isVector=False), str(path)
    )
    msg = _error(path)
    assert "is 4D (5 x 4 x 3 x 2)" in msg and "needs one 3D volume" in msg


def test_rgb_volume(tmp_path):
    path = tmp_path / "rgb.nrrd"
    sitk.WriteImage(
        sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.uint8), isVector=True), str(path)
    )
    assert "has 3 components per voxel" in _error(path)


def test_garbage_with_nrrd_suffix(tmp_path):
    path = tmp_path / "garbage.nrrd"
    path.write_bytes(os.urandom(4096))
    msg = _error(path)
    assert msg.startswith(f"cannot read image {path}: not a readable image")


def test_labels_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match=r"label map .*none\.seg\.nrrd does not exist"):
        volume.read_labels(tmp_path / "none.seg.nrrd")
    bad = tmp_path / "bad.seg.nrrd"
    bad.write_bytes(b"NRRD0004\nthis is not right\n")
    with pytest.raises(InputError) as exc:
        volume.read_labels(bad)
    assert str(bad) in str(exc.value) and "\n" not in str(exc.value)


def test_listing_into_a_closed_pipe_is_not_an_error():
    """`oflsam2 weights list | head -1` used to end with 'internal error: BrokenPipeError'."""
    exe = str(Path(sys.executable).with_name("oflsam2"))
    for _ in range(6):
        proc = subprocess.run(
            f"'{exe}' weights list | head -c 10 >/dev/null",
            shell=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "internal error" not in proc.stderr
