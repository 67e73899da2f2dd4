"""The extension's CMake files, evaluated by real CMake in script mode with Slicer's macros stubbed.

Catches what breaks the Slicer extension build without a Slicer build tree: a CMake syntax
error, a missing EXTENSION_* variable, and above all an engine file that is not listed
(the installed module would then fail at import time inside Slicer only).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "OFLSAM2Slicer"
PACKAGES = ("oflsam2", "oflsam2_slicer")

# Stand-ins for what find_package(Slicer) provides; each records its arguments in OUT.
STUBS = r"""
macro(project)
  set(PROJECT_NAME ${ARGV0})
  file(APPEND "${OUT}" "PROJECT=${ARGV0}\n")
endmacro()
macro(find_package)
  set(Slicer_VERSION_MAJOR 5)
  set(Slicer_VERSION_MINOR ${SLICER_MINOR})
  set(Slicer_USE_FILE "${EMPTY}")
  set(Slicer_EXTENSION_GENERATE_CONFIG "${EMPTY}")
  set(Slicer_EXTENSION_CPACK "${EMPTY}")
endmacro()
function(add_subdirectory dir)
  file(APPEND "${OUT}" "SUBDIRECTORY=${dir}\n")
  include("${SRC}/${dir}/CMakeLists.txt")
endfunction()
function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(M "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  file(APPEND "${OUT}" "MODULE=${M_NAME}\nSCRIPTS=${M_SCRIPTS}\nRESOURCES=${M_RESOURCES}\n")
endfunction()
function(slicer_add_python_unittest)
  cmake_parse_arguments(U "" "SCRIPT" "" ${ARGN})
  file(APPEND "${OUT}" "UNITTEST=${U_SCRIPT}\n")
endfunction()
set(BUILD_TESTING ON)
include("${SRC}/CMakeLists.txt")
foreach(v HOMEPAGE CATEGORY CONTRIBUTORS DESCRIPTION ICONURL SCREENSHOTURLS DEPENDS)
  file(APPEND "${OUT}" "EXTENSION_${v}=${EXTENSION_${v}}\n")
endforeach()
"""


def run_cmake(work: Path, slicer_minor: int = 10) -> subprocess.CompletedProcess:
    """Evaluate the extension's CMake files against a stubbed Slicer 5.<slicer_minor>."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    (work / "empty.cmake").write_text("")
    script = work / "check.cmake"
    script.write_text(STUBS)
    return subprocess.run(
        [
            cmake,
            f"-DSRC={ROOT}",
            f"-DOUT={work / 'out.txt'}",
            f"-DEMPTY={work / 'empty.cmake'}",
            f"-DSLICER_MINOR={slicer_minor}",
            "-P",
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> dict[str, str]:
    work = tmp_path_factory.mktemp("cmake")
    proc = run_cmake(work)
    out = work / "out.txt"
    assert proc.returncode == 0, proc.stderr
    values: dict[str, str] = {}
    for line in out.read_text().splitlines():
        key, _, value = line.partition("=")
        values[key] = value
    return values


def test_extension_metadata(evaluated):
    assert evaluated["PROJECT"] == "OFLSAM2Slicer"
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert evaluated[f"EXTENSION_{key}"].strip(), key
    assert "PyTorch" in evaluated["EXTENSION_DEPENDS"].split(";")
    assert evaluated["EXTENSION_ICONURL"].endswith(".png")
    assert evaluated["SUBDIRECTORY"] == "OFLSAM2Slicer"


def test_module_lists_every_python_file(evaluated):
    assert evaluated["MODULE"] == "OFLSAM2Slicer"
    listed = evaluated["SCRIPTS"].split(";")
    assert len(listed) == len(set(listed)), "a script is listed twice"
    on_disk = {"OFLSAM2Slicer.py"} | {
        p.relative_to(MODULE_DIR).as_posix()
        for package in PACKAGES
        for p in (MODULE_DIR / package).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    missing = sorted(on_disk - set(listed))
    assert not missing, (
        f"Python files not in OFLSAM2Slicer/CMakeLists.txt (Slicer would not install them): {missing}"
    )
    absent = sorted(set(listed) - on_disk)
    assert not absent, f"OFLSAM2Slicer/CMakeLists.txt lists files that do not exist: {absent}"


def test_resources_exist(evaluated):
    resources = evaluated["RESOURCES"].split(";")
    assert {
        "Resources/Icons/OFLSAM2Slicer.png",
        "Resources/UI/OFLSAM2Slicer.ui",
        "Resources/requirements.txt",
    } <= set(resources)
    for resource in resources:
        assert (MODULE_DIR / resource).is_file(), resource
    assert evaluated["UNITTEST"] == "OFLSAM2Slicer.py"


def test_icons_are_128_pixel_pngs():
    from PIL import Image

    for path in (
        MODULE_DIR / "Resources/Icons/OFLSAM2Slicer.png",
        ROOT / "Resources/Icons/OFLSAM2Slicer.png",
    ):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (128, 128), path


def test_extension_descriptions_agree(evaluated):
    entry = json.loads((ROOT / "OFLSAM2Slicer.json").read_text())
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/")
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["category"] == evaluated["EXTENSION_CATEGORY"]
    s4ext = {}
    for line in (ROOT / "OFLSAM2Slicer.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            s4ext[key] = value.strip()
    assert s4ext["depends"] == "PyTorch"
    assert s4ext["category"] == entry["category"]
    assert s4ext["scmurl"].removesuffix(".git") == entry["scm_url"]
    assert s4ext["iconurl"] == evaluated["EXTENSION_ICONURL"]


def test_older_slicer_is_refused_at_configure_time(tmp_path):
    proc = run_cmake(tmp_path, slicer_minor=8)
    assert proc.returncode != 0
    assert "needs Slicer 5.10 or later" in proc.stderr and "this is Slicer 5.8" in proc.stderr
    newer = tmp_path / "newer"
    newer.mkdir()
    assert run_cmake(newer, slicer_minor=12).returncode == 0


def test_license_and_index_conventions(evaluated):
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text  # the full text, not a pointer
    assert evaluated["EXTENSION_CONTRIBUTORS"] == "OFLSAM2Slicer developers"
    # the Extensions Index wants the repository named Slicer<something>
    entry = json.loads((ROOT / "OFLSAM2Slicer.json").read_text())
    assert entry["scm_url"].rsplit("/", 1)[1].startswith("Slicer")
    assert "/SlicerOFLSAM2" in evaluated["EXTENSION_HOMEPAGE"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "3d-slicer-extension" in readme and "SlicerOFLSAM2" in readme
    assert "Slicer 5.10" in readme
