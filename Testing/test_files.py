"""oflsam2.files (whole-or-nothing writes with plain permissions) and errors.first_line."""

from __future__ import annotations

import os

import pytest

from oflsam2.errors import first_line
from oflsam2.files import atomic_path, current_umask, new_file_mode, write_atomic


def test_atomic_path_replaces_whole_file(tmp_path):
    target = tmp_path / "out.nii.gz"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.nii.gz.")
        assert tmp.name.endswith(".tmp.nii.gz")  # writers that pick the format by name still can
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # nothing visible before the body ends
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.nii.gz"]


def test_atomic_path_failure_keeps_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.json"]


def test_atomic_path_missing_folder_is_an_os_error(tmp_path):
    with pytest.raises(OSError), atomic_path(tmp_path / "no" / "x.json"):
        pass


def test_write_atomic_text_and_bytes(tmp_path):
    write_atomic(tmp_path / "a.txt", "héllo")
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.bin"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_modes_follow_umask_or_the_replaced_file(tmp_path):
    mask = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        assert new_file_mode() == 0o640
        path = tmp_path / "x"
        write_atomic(path, "a")
        assert path.stat().st_mode & 0o777 == 0o640  # not mkstemp's 0600
        path.chmod(0o604)
        assert new_file_mode(path) == 0o604
        write_atomic(path, "b")
        assert path.stat().st_mode & 0o777 == 0o604  # an overwrite keeps the permissions
    finally:
        os.umask(mask)


def test_first_line():
    assert first_line(ValueError("  first\nsecond\n")) == "first"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(RuntimeError("x" * 300)) == "x" * 160
    assert first_line(RuntimeError("x" * 300), limit=None) == "x" * 300
    assert first_line(None) == "unknown error"
