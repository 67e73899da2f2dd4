"""`oflsam2 train` and `oflsam2 apply` end to end: files, report, resumable batch, errors."""

from __future__ import annotations

import json
import os

import pytest
import SimpleITK as sitk
from learner_data import folder, learner_path

from oflsam2 import cli, learner_file


@pytest.mark.slow
@pytest.mark.engine
def test_train_writes_a_learner_file_and_a_report(tmp_path, capsys):
    data = folder()
    out, report = tmp_path / "lung.oflsam2", tmp_path / "train.json"
    argv = [
        "train", "--image", str(data / "a.nrrd"), "--labels", str(data / "a_lab.nrrd"),
        "--image", str(data / "b.nrrd"), "--labels", str(data / "b_lab.nrrd"),
        "--output", str(out), "--slices-per-volume", "2", "--negatives", "0",
        "--train-steps", "3", "--json", str(report),
    ]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert f"wrote {out}" in capsys.readouterr().err
    lf = learner_file.load(out)
    assert lf.values == [1] and lf.meta["backbone"] == "litemedsam"
    volumes = lf.meta["training"]["volumes"]
    assert [v["name"] for v in volumes] == ["a.nrrd", "b.nrrd"]
    assert all(len(v["positive"]) == 2 for v in volumes)
    assert json.loads(report.read_text())["training"] == lf.meta["training"]


@pytest.mark.slow
@pytest.mark.engine
def test_apply_resumes_a_batch_and_reports_every_volume(tmp_path, capsys):
    data, out = folder(), tmp_path / "out"
    out.mkdir()
    kept = out / "a.nrrd"
    kept.write_bytes(b"from an earlier run")
    report = tmp_path / "apply.json"
    argv = [
        "apply", "--learner", str(learner_path()), "--input-dir", str(data),
        "--output-dir", str(out), "--json", str(report),
    ]  # fmt: skip
    # the folder holds a.nrrd, b.nrrd and their label maps a_lab.nrrd, b_lab.nrrd: only the
    # two images are volumes to segment when the label maps are named apart
    for extra in data.glob("*_lab.nrrd"):
        os.replace(extra, extra.with_name(extra.name.replace("_lab.nrrd", ".lab.seg.nrrd")))
    try:
        assert cli.main(argv) == 0, capsys.readouterr().err
    finally:
        for extra in data.glob("*.lab.seg.nrrd"):
            os.replace(extra, extra.with_name(extra.name.replace(".lab.seg.nrrd", "_lab.nrrd")))
    err = capsys.readouterr().err
    assert "1 of 2 outputs exist and are kept" in err and "[1/1]" in err
    assert kept.read_bytes() == b"from an earlier run"
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "b.nrrd")))
    assert written.any() and set(written.ravel().tolist()) <= {0, 1}
    rep = json.loads(report.read_text())
    assert (rep["written"], rep["skipped"], rep["failed"]) == (1, 1, 0)
    statuses = {os.path.basename(v["image"]): v["status"] for v in rep["volumes"]}
    assert statuses == {"a.nrrd": "skipped", "b.nrrd": "written"}
    b = [v for v in rep["volumes"] if v["status"] == "written"][0]
    assert b["attempts"] == 1 and b["seeds"] and b["voxels"]["1"] == int(written.sum())


@pytest.mark.slow
def test_apply_reports_a_bad_volume_and_goes_on(tmp_path, capsys):
    bad = tmp_path / "broken.nrrd"
    bad.write_text("NRRD0004\nnot really\n")
    argv = [
        "apply", "--learner", str(learner_path()), "--image", str(bad),
        "--output-dir", str(tmp_path / "o"), "--json", str(tmp_path / "r.json"), "-q",
    ]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.nrrd" in err[0]
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["volumes"][0]["status"] == "failed" and rep["volumes"][0]["kind"] == "input"
    assert not (tmp_path / "o" / "broken.nrrd").exists()


def test_train_refuses_unpaired_inputs(tmp_path, capsys):
    argv = ["train", "--image", "a.nrrd", "--output", str(tmp_path / "x.oflsam2"),
            "--labels", "a.nrrd", "--image", "b.nrrd"]  # fmt: skip
    assert cli.main(argv) == 2
    assert "one --labels per --image" in capsys.readouterr().err
