"""`oflsam2 apply --scheduler`: a Dask LocalCluster with two worker processes gives the
single-machine outputs, voxel for voxel."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from learner_data import folder, learner_path

from oflsam2 import cli

distributed = pytest.importorskip("distributed")


def apply_argv(out, report, *options):
    data = folder()
    return [
        "apply", "--learner", str(learner_path()), "--image", str(data / "a.nrrd"),
        "--image", str(data / "b.nrrd"), "--output-dir", str(out), "--json", str(report),
        "-q", *options,
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.engine
def test_local_cluster_gives_the_single_machine_outputs(tmp_path):
    here, there = tmp_path / "here", tmp_path / "cluster"
    assert cli.main(apply_argv(here, tmp_path / "here.json")) == 0
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        code = cli.main(
            apply_argv(there, tmp_path / "there.json", "--scheduler", cluster.scheduler_address)
        )
    assert code == 0
    report = json.loads((tmp_path / "there.json").read_text())
    assert report["written"] == 2 and report["failed"] == 0
    assert report["scheduler"].startswith("tcp://")
    local = json.loads((tmp_path / "here.json").read_text())
    for name in ("a", "b"):
        mine = sitk.GetArrayFromImage(sitk.ReadImage(str(here / f"{name}.nrrd")))
        theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(there / f"{name}.nrrd")))
        assert mine.any()
        np.testing.assert_array_equal(mine, theirs)
    assert [v["seeds"] for v in report["volumes"]] == [v["seeds"] for v in local["volumes"]]
    # no temporary file left behind by the workers' atomic writes
    assert sorted(p.name for p in there.iterdir()) == ["a.nrrd", "b.nrrd"]


@pytest.mark.slow
def test_an_unreachable_scheduler_is_one_line_and_exit_2(tmp_path, capsys):
    code = cli.main(
        apply_argv(tmp_path / "o", tmp_path / "r.json", "--scheduler", "tcp://127.0.0.1:9")
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot reach the Dask scheduler" in err and len(err.splitlines()) == 1
