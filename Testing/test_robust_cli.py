"""The command line as a hostile user meets it (issue 11): every bad input, bad path and
signal ends with one line and exit 2 (or 130 / 143), overwrites nothing, leaves nothing
behind; a good one writes all its outputs or none.

The cases run ``oflsam2.cli.main`` in-process with the engine replaced by
:class:`FakeSegmenter` (it keeps the painted slices), so that they cost milliseconds: every
check under test fires before the engine is built, and the writing after it is the real
one. ``run_case`` and ``check_case`` are shared with the header fuzz suite
(test_fuzz_cli.py), which runs hundreds of mutated files through the same code in one
child process. A few slow tests send signals to a real run.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from oflsam2 import cli, cli_segment, files
from oflsam2 import volume as vol
from oflsam2.errors import InputError

SHAPE = (8, 10, 12)  # (k, j, i)
GRID = vol.Geometry((12, 10, 8), (0.8, 0.9, 2.5), (-5.5, 3.25, 10.0))
PAINTED = (2, 5)  # painted slices along axis 0
FAST = ("--backbone", "sam2", "--random-init", "--image-size", "512", "--fit-steps", "1")
FAST += ("--no-online", "-q")


# ------------------------------------------------------------------ a stand-in engine


class _FakeBackbone:
    name = "fake"
    weights = "FAKE ENGINE (tests of the command line)"
    random_weights = True
    input_size = 512
    device = "cpu"

    def bytes_per_slice(self) -> int:
        return 1


class FakeSegmenter:
    """What the command line uses of OFLSegmenter. Its result is the painted slices, its
    window the real one (so that broken voxels reach it) and its loss NaN (so that the
    report must turn it into valid JSON)."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.backbone = _FakeBackbone()
        self.encoder_calls = 0
        self.roi = None
        self.window = None

    def set_volume(self, array, geometry=None, modality=None) -> None:
        self.array, self.modality = array, modality

    def fit(self, sparse, slices=None, axis="auto", progress=None) -> None:
        self.ann = vol.find_annotated(sparse, axis, slices)
        self.sparse = sparse
        self.window = vol.intensity_window(self.array, self.modality, sparse > 0)

    def propagate(self, progress=None):
        from oflsam2.segmenter import Result

        labels = np.array(self.sparse, np.uint8)
        values = sorted(self.ann.per_segment)
        return Result(
            labels=labels,
            confidence=np.full(labels.shape[self.ann.axis], np.nan),
            axis=self.ann.axis,
            annotated=list(self.ann.slices),
            timings={"encode": 0.0, "fit": 0.0, "propagate": 0.0},
            predicted_slices={v: [] for v in values},
            voxels={v: int(np.count_nonzero(labels == v)) for v in values},
            losses={v: [float("nan")] for v in values},
        )


def fake_build(settings, n_slices, quiet):
    return FakeSegmenter(settings)


@pytest.fixture
def fake_engine(monkeypatch):
    monkeypatch.setattr(cli_segment, "build_segmenter", fake_build)


# ------------------------------------------------------------------ inputs


def _image() -> np.ndarray:
    k, j, i = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    blob = np.exp(-((k - 3.5) ** 2 / 6 + (j - 4.5) ** 2 / 8 + (i - 5.5) ** 2 / 10))
    return (400 * blob - 100).astype(np.int16)


def _labels() -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    for k in PAINTED:
        lab[k, 2:8, 3:9] = 1
        lab[k, 4:6, 5:7] = 3
    return lab


def _save(folder: Path, name: str, array, grid=GRID, vector=False) -> None:
    image = sitk.GetImageFromArray(array, isVector=vector)
    if image.GetDimension() == 3:
        image.SetSpacing(grid.spacing)
        image.SetOrigin(grid.origin)
        image.SetDirection(grid.direction)
    sitk.WriteImage(image, str(folder / name))


def _nrrd_header_edit(path: Path, old: str, new: str) -> None:
    data = path.read_bytes()
    head, sep, body = data.partition(b"\n\n")
    assert old.encode() in head, head
    path.write_bytes(head.replace(old.encode(), new.encode()) + sep + body)


def make_inputs(folder: Path) -> Path:
    """Every input file the cases name, in ``folder`` (made once per session or batch)."""
    folder.mkdir(parents=True, exist_ok=True)
    img, lab = _image(), _labels()
    for name in ("img.nrrd", "img.nii.gz", "img.mha", "ü ñ 空 space.nrrd"):
        _save(folder, name, img)
    sitk.WriteImage(GRID.to_sitk(img), str(folder / "raw.nrrd"), useCompression=False)
    vol.write_labels(folder / "lab.nrrd", lab, GRID)
    vol.write_labels(folder / "lab.nii.gz", lab, GRID)
    vol.write_labels(folder / "lab.seg.nrrd", lab, GRID, names={1: "organ", 3: "lesion"})
    # item 2: broken voxels
    flt = img.astype(np.float32)
    _save(folder, "float.nrrd", flt)
    nan = flt.copy()
    nan[0, 0, :3] = np.nan
    _save(folder, "nan.nrrd", nan)
    inf = flt.copy()
    inf[7, 9, 11] = np.inf
    _save(folder, "inf.nrrd", inf)
    big = img.astype(np.float64)
    big[0, 0, 0] = 1e300
    _save(folder, "big64.nrrd", big)
    nanlab = lab.astype(np.float32)
    nanlab[PAINTED[0], 0, 0] = np.nan
    _save(folder, "nanlab.nrrd", nanlab)
    # item 5 and other kinds of images
    _save(folder, "cplx.nrrd", (img + 1j * img).astype(np.complex64))
    _save(folder, "cplx.nii.gz", (img + 1j * img).astype(np.complex64))
    _save(folder, "cplxlab.nrrd", (lab + 0j).astype(np.complex64))
    _save(folder, "vec.nrrd", np.stack([img] * 3, axis=-1), vector=True)
    sitk.WriteImage(sitk.GetImageFromArray(img[0]), str(folder / "flat.nrrd"))
    sitk.WriteImage(
        sitk.GetImageFromArray(np.stack([img, img]), isVector=False), str(folder / "four.nrrd")
    )
    # item 6: slices along two axes, or everywhere
    two = lab.copy()
    two[1:7, 5, 4:8] = 1  # a stroke on a coronal slice across the axial ones
    vol.write_labels(folder / "twoaxes.nrrd", two, GRID)
    segs = lab.copy()
    segs[segs == 3] = 0
    segs[1:7, 2:8, 10] = 2  # segment 2 on a sagittal slice
    vol.write_labels(folder / "twosegs.nrrd", segs, GRID)
    every = np.zeros(SHAPE, np.uint8)
    every[:, 1:9, 1:11] = 1  # all 8 slices along k, the fewest of any axis
    vol.write_labels(folder / "allslices.nrrd", every, GRID)
    # item 9 and 10: unreadable and absurd headers
    data = (folder / "raw.nrrd").read_bytes()
    (folder / "trunc.nrrd").write_bytes(data[: len(data) - 100])
    shutil.copy(folder / "raw.nrrd", folder / "huge.nrrd")
    _nrrd_header_edit(folder / "huge.nrrd", "sizes: 12 10 8", "sizes: 100000 100000 100000")
    shutil.copy(folder / "raw.nrrd", folder / "zero.nrrd")
    _nrrd_header_edit(folder / "zero.nrrd", "sizes: 12 10 8", "sizes: 12 0 8")
    for name, grid in (
        ("moved.nrrd", vol.Geometry(GRID.size, GRID.spacing, (0.0, 0.0, 0.0))),
        ("spaced.nrrd", vol.Geometry(GRID.size, (1.0, 1.0, 3.0), GRID.origin)),
        ("turned.nrrd", vol.Geometry(GRID.size, GRID.spacing, GRID.origin, (0, 1, 0, 1, 0, 0, 0, 0, 1))),
    ):  # fmt: skip
        vol.write_labels(folder / name, lab, grid)
    (folder / "empty_dir").mkdir(exist_ok=True)
    (folder / "junk_dir").mkdir(exist_ok=True)
    (folder / "junk_dir" / "notes.txt").write_text("not DICOM")
    (folder / "junk_dir" / "x.dcm").write_bytes(b"\0" * 300)
    (folder / "empty.pt").write_bytes(b"")
    (folder / "ckpt_dir").mkdir(exist_ok=True)
    # bad label maps
    for name, value, dtype in (("lab300.nrrd", 300, np.uint16), ("labneg.nrrd", -1, np.int16)):
        arr = lab.astype(dtype)
        arr[PAINTED[0], 0, 0] = value
        _save(folder, name, arr)
    _save(folder, "labfrac.nrrd", lab.astype(np.float32) * 0.5)
    vol.write_labels(folder / "labempty.nrrd", np.zeros(SHAPE, np.uint8), GRID)
    (folder / "garbage.nrrd").write_bytes(np.random.default_rng(0).bytes(4096))
    (folder / "zerobytes.nrrd").write_bytes(b"")
    for link, target in (("link.nrrd", "img.nrrd"), ("imglink.json", "img.nrrd")):
        with contextlib.suppress(FileNotFoundError):
            (folder / link).unlink()
        (folder / link).symlink_to(target)
    with contextlib.suppress(FileNotFoundError):
        (folder / "hard.nrrd").unlink()
    os.link(folder / "lab.nrrd", folder / "hard.nrrd")
    return folder


# ------------------------------------------------------------------ the cases


def seg(image="{i}/img.nrrd", labels="{i}/lab.nrrd", output="{o}/o.nrrd", *extra) -> list[str]:
    return ["segment", "--image", image, "--labels", labels, "--output", output, *FAST, *extra]


def _case(cid, argv, rc, want=None, pre=None, outputs=("o.nrrd",), tag="") -> dict:
    return {"id": cid, "argv": list(argv), "rc": rc, "want": want, "pre": pre or {},
            "outputs": list(outputs), "class": tag}  # fmt: skip


def issue_cases() -> list[dict]:
    """Every case of issue 11's items 1-6, 9 and 10, and the bad inputs around them."""
    J = ("--json", "{o}/r.json")
    keep = {"o.nrrd": {"text": "user data"}}
    c = _case
    return [
        # item 1: --json and --output against the inputs and each other
        c("json-is-image", seg("{i}/img.nrrd", "{i}/lab.nrrd", "{o}/o.nrrd", "--json", "{i}/imglink.json"), 2, "is the --image file", tag="1 paths"),
        c("json-is-output", seg() + list(J), 2, "is the --output file", pre={"o.nrrd": {"text": "user data"}, "r.json": {"link": "o.nrrd"}}, tag="1 paths"),
        c("json-wrong-extension", seg() + ["--json", "{o}/o.nrrd"], 2, "ending in .json", tag="1 paths"),
        c("output-is-image", seg(output="{i}/img.nrrd"), 2, "never overwritten", tag="1 paths"),
        c("output-is-labels", seg(output="{i}/lab.nrrd"), 2, "is the --labels file", tag="1 paths"),
        c("output-links-to-image", seg(output="{i}/link.nrrd"), 2, "is the --image file", tag="1 paths"),
        c("output-hard-link-to-labels", seg(output="{i}/hard.nrrd"), 2, "is the --labels file", tag="1 paths"),
        # item 2: broken voxels
        c("nan-voxels", seg("{i}/nan.nrrd"), 2, "has 3 non-finite voxels", tag="2 voxels"),
        c("inf-voxel", seg("{i}/inf.nrrd"), 2, "has 1 non-finite voxels", tag="2 voxels"),
        c("beyond-float32", seg("{i}/big64.nrrd"), 2, "beyond the float32 range", tag="2 voxels"),
        c("nan-labels", seg(labels="{i}/nanlab.nrrd"), 2, "1 non-finite values", tag="2 voxels"),
        c("float-image-nan-loss-valid-json", seg("{i}/float.nrrd") + list(J), 0, outputs=("o.nrrd", "r.json"), tag="2 voxels"),
        # item 3: outputs checked before any work, all or none
        c("json-folder-missing", seg() + ["--json", "{o}/no/r.json"], 2, "does not exist", tag="3 outputs"),
        c("json-is-a-folder", seg() + ["--json", "{o}/d.json"], 2, "is a folder", pre={"d.json": {"dir": True}}, tag="3 outputs"),
        c("json-unwritable", seg() + ["--json", "/proc/r.json"], 2, "cannot write --json", tag="3 outputs"),
        c("output-folder-missing", seg(output="{o}/no/o.nrrd"), 2, "does not exist", tag="3 outputs"),
        c("output-is-a-folder", seg(output="{o}/d.nrrd"), 2, "is a folder", pre={"d.nrrd": {"dir": True}}, tag="3 outputs"),
        c("output-unwritable", seg(output="/proc/o.nrrd"), 2, "cannot write --output", tag="3 outputs"),
        c("output-dev-null", seg(output="/dev/null"), 2, "extensions", tag="3 outputs"),
        c("output-txt", seg(output="{o}/o.txt"), 2, "extensions", tag="3 outputs"),
        c("output-detached-header", seg(output="{o}/o.nhdr"), 2, "extensions", tag="3 outputs"),
        c("output-upper-case-nifti", seg(output="{o}/o.NII.GZ"), 2, "(lower case)", tag="3 outputs"),
        c("output-kept-when-input-bad", seg("{i}/missing.nrrd"), 2, "does not exist", pre=keep, tag="3 outputs"),
        c("output-kept-when-json-bad", seg() + ["--json", "/proc/r.json"], 2, "cannot write", pre=keep, tag="3 outputs"),
        c("output-replaced-when-good", seg() + list(J), 0, pre=keep, outputs=("o.nrrd", "r.json"), tag="3 outputs"),
        # item 5 and other image kinds
        c("complex-nrrd", seg("{i}/cplx.nrrd"), 2, "complex voxels", tag="5 kinds"),
        c("complex-nifti", seg("{i}/cplx.nii.gz"), 2, "complex voxels", tag="5 kinds"),
        c("complex-labels", seg(labels="{i}/cplxlab.nrrd"), 2, "complex", tag="5 kinds"),
        c("vector-image", seg("{i}/vec.nrrd"), 2, "3 components per voxel", tag="5 kinds"),
        c("2d-image", seg("{i}/flat.nrrd"), 2, "is 2D", tag="5 kinds"),
        c("4d-image", seg("{i}/four.nrrd"), 2, "is 4D", tag="5 kinds"),
        # item 6: slices along two axes, or no slice left
        c("stroke-on-another-axis", seg(labels="{i}/twoaxes.nrrd"), 2, "two axes, 0 (k) and 1 (j)", tag="6 axes"),
        c("segments-on-two-axes", seg(labels="{i}/twosegs.nrrd"), 2, "two axes", tag="6 axes"),
        c("two-axes-with-named-axis", seg(labels="{i}/twoaxes.nrrd") + ["--axis", "0"], 0, tag="6 axes"),
        c("every-slice-labelled", seg(labels="{i}/allslices.nrrd"), 2, "nothing is left to propagate", tag="6 axes"),
        # item 9: messages a user can act on
        c("truncated-nrrd", seg("{i}/trunc.nrrd"), 2, "% of the expected data", tag="9 messages"),
        c("grid-origin", seg(labels="{i}/moved.nrrd"), 2, "origin (0, 0, 0) vs (-5.5, 3.25, 10)", tag="9 messages"),
        c("grid-spacing", seg(labels="{i}/spaced.nrrd"), 2, "spacing (1, 1, 3) vs (0.8, 0.9, 2.5)", tag="9 messages"),
        c("grid-direction", seg(labels="{i}/turned.nrrd"), 2, "direction differs", tag="9 messages"),
        c("empty-folder-image", seg("{i}/empty_dir"), 2, "is empty", tag="9 messages"),
        c("folder-without-dicom", seg("{i}/junk_dir"), 2, "no DICOM series", tag="9 messages"),
        c("checkpoint-and-random-init", seg() + ["--checkpoint", "{i}/empty.pt"], 2, "exclude each other", tag="9 messages"),
        c("empty-checkpoint-sam2", ["segment", "--image", "{i}/img.nrrd", "--labels", "{i}/lab.nrrd", "--output", "{o}/o.nrrd", "--backbone", "sam2", "--checkpoint", "{i}/empty.pt"], 2, "is empty (0 bytes)", tag="9 messages"),
        c("checkpoint-folder", ["segment", "--image", "{i}/img.nrrd", "--labels", "{i}/lab.nrrd", "--output", "{o}/o.nrrd", "--backbone", "sam2", "--checkpoint", "{i}/ckpt_dir"], 2, "is not a file", tag="9 messages"),
        c("checkpoint-missing", ["segment", "--image", "{i}/img.nrrd", "--labels", "{i}/lab.nrrd", "--output", "{o}/o.nrrd", "--backbone", "sam2", "--checkpoint", "{i}/none.pt"], 2, "does not exist", tag="9 messages"),
        c("fit-steps-0", seg() + ["--fit-steps", "0"], 2, "--fit-steps must be 1 or more", tag="9 messages"),
        c("fit-steps-negative", seg() + ["--fit-steps", "-3"], 2, "--fit-steps must be 1 or more", tag="9 messages"),
        c("model-unknown", seg() + ["--model", "sam3_giant"], 2, "is not a SAM2 model", tag="9 messages"),
        c("model-for-litemedsam", ["segment", "--image", "{i}/img.nrrd", "--labels", "{i}/lab.nrrd", "--output", "{o}/o.nrrd", "--backbone", "litemedsam", "--model", "sam2.1_hiera_tiny"], 2, "does not exist for --backbone litemedsam", tag="9 messages"),
        c("random-init-litemedsam", ["segment", "--image", "{i}/img.nrrd", "--labels", "{i}/lab.nrrd", "--output", "{o}/o.nrrd", "--backbone", "litemedsam", "--random-init"], 2, "SAM2 only", tag="9 messages"),
        # item 10: absurd sizes refused from the header
        c("absurd-size", seg("{i}/huge.nrrd"), 2, "100000 x 100000 x 100000 voxels", tag="10 sizes"),
        c("zero-size", seg("{i}/zero.nrrd"), 2, "size is zero", tag="10 sizes"),
        # around them
        c("missing-image", seg("{i}/missing.nrrd"), 2, "does not exist", tag="other"),
        c("garbage-image", seg("{i}/garbage.nrrd"), 2, "not a readable image", tag="other"),
        c("zero-byte-image", seg("{i}/zerobytes.nrrd"), 2, "not a readable image", tag="other"),
        c("labels-300", seg(labels="{i}/lab300.nrrd"), 2, "outside 0..255", tag="other"),
        c("labels-negative", seg(labels="{i}/labneg.nrrd"), 2, "outside 0..255", tag="other"),
        c("labels-fractional", seg(labels="{i}/labfrac.nrrd"), 2, "non-integer", tag="other"),
        c("labels-empty", seg(labels="{i}/labempty.nrrd"), 2, "empty", tag="other"),
        c("labels-missing", seg(labels="{i}/none.seg.nrrd"), 2, "does not exist", tag="other"),
        c("slices-not-numbers", seg() + ["--slices", "a,b"], 2, "--slices", tag="other"),
        c("slices-outside", seg() + ["--slices", "2,5,99"], 2, "outside 0..7", tag="other"),
        c("slices-missing-one", seg() + ["--slices", "2"], 2, "not in --slices", tag="other"),
        c("gamma-nan", seg() + ["--gamma", "nan"], 2, "gamma", tag="other"),
        c("gamma-above-1", seg() + ["--gamma", "2"], 2, "gamma", tag="other"),
        c("seed-negative", seg() + ["--seed", "-1"], 2, "--seed", tag="other"),
        c("seed-huge", seg() + ["--seed", str(2**70)], 2, "--seed", tag="other"),
        c("axis-5", seg() + ["--axis", "5"], 2, "--axis", tag="other"),
        c("unknown-option", seg() + ["--frobnicate"], 2, "--frobnicate", tag="other"),
        c("good-nrrd", seg() + list(J), 0, outputs=("o.nrrd", "r.json"), tag="good"),
        c("good-nifti-in-seg-out", seg("{i}/img.nii.gz", "{i}/lab.nii.gz", "{o}/o.seg.nrrd"), 0, outputs=("o.seg.nrrd",), tag="good"),
        c("good-seg-in-nifti-out", seg("{i}/img.mha", "{i}/lab.seg.nrrd", "{o}/o.nii.gz"), 0, outputs=("o.nii.gz",), tag="good"),
        c("good-mha-out-unicode-in", seg("{i}/ü ñ 空 space.nrrd", output="{o}/ü o.mha"), 0, outputs=("ü o.mha",), tag="good"),
        c("good-explicit-slices", seg() + ["--slices", "2,5,6"], 0, tag="good"),
    ]  # fmt: skip


# ------------------------------------------------------------------ running and checking


def _digest(path: Path) -> str:
    if path.is_symlink():
        return "link:" + os.readlink(path)
    if path.is_dir():
        return "dir"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (hidden ones too) with a hash of its content."""
    return {str(p.relative_to(folder)): _digest(p) for p in sorted(folder.rglob("*"))}


def _make_pre(folder: Path, pre: dict) -> None:
    for name, spec in pre.items():
        path = folder / name
        if "dir" in spec:
            path.mkdir()
        elif "link" in spec:
            path.symlink_to(spec["link"])
        else:
            path.write_text(spec["text"])


@contextlib.contextmanager
def _captured_fd(fd: int, name: str):
    """Everything written to file descriptor ``fd`` (C++ libraries too) and to sys.<name>."""
    with tempfile.TemporaryFile() as sink, open(fd, "wb", closefd=False) as raw:
        saved_fd, saved_obj = os.dup(fd), getattr(sys, name)
        saved_obj.flush()
        os.dup2(sink.fileno(), fd)
        stream = io.TextIOWrapper(raw, write_through=True)
        setattr(sys, name, stream)
        text: list[str] = []
        try:
            yield text
        finally:
            stream.flush()
            stream.detach()
            setattr(sys, name, saved_obj)
            os.dup2(saved_fd, fd)
            os.close(saved_fd)
            sink.seek(0)
            text.append(sink.read().decode("utf-8", "replace"))


def run_case(case: dict, inputs: Path, outputs: Path) -> dict:
    """Run one case through ``cli.main`` in this process; what came of it."""
    out = outputs / case["id"]
    out.mkdir(parents=True)
    _make_pre(out, case["pre"])
    argv = [a.replace("{i}", str(inputs)).replace("{o}", str(out)) for a in case["argv"]]
    before = snapshot(out)
    t0 = time.perf_counter()
    with _captured_fd(2, "stderr") as err, _captured_fd(1, "stdout") as std:
        try:
            rc = cli.main(argv)
        except SystemExit as exc:
            rc = exc.code
    return {
        "id": case["id"],
        "rc": rc,
        "stderr": err[0],
        "stdout": std[0],
        "before": before,
        "after": snapshot(out),
        "seconds": time.perf_counter() - t0,
    }


def check_case(case: dict, got: dict) -> list[str]:
    """What is wrong with how a case ended (an empty list: it was handled as promised)."""
    problems = []
    lines = got["stderr"].splitlines()
    if case["rc"] is not None and got["rc"] != case["rc"]:
        problems.append(f"exit {got['rc']}, expected {case['rc']}")
    if got["rc"] not in (0, 2):
        problems.append(f"exit {got['rc']}")
    if "Traceback" in got["stderr"] or "np.float64" in got["stderr"]:
        problems.append("traceback or numpy repr on stderr")
    if got["rc"] == 2:
        if len(lines) != 1 or not lines[0].startswith("oflsam2: error: "):
            problems.append(f"{len(lines)} lines on stderr, expected one error line")
        if case["want"] and case["want"] not in got["stderr"]:
            problems.append(f"message lacks {case['want']!r}")
        if got["after"] != got["before"]:
            problems.append("the output folder changed")
    if got["rc"] == 0:
        if lines:
            problems.append(f"{len(lines)} lines on stderr with --quiet")
        expected = set(got["before"]) | set(case["outputs"])
        if set(got["after"]) != expected:
            problems.append(
                f"output folder holds {sorted(got['after'])}, expected {sorted(expected)}"
            )
    return problems


def _strict_json(path: Path):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return make_inputs(tmp_path_factory.mktemp("robust") / "in")


CASES = {case["id"]: case for case in issue_cases()}


@pytest.mark.parametrize("cid", list(CASES))
def test_issue_case(cid, inputs, tmp_path, fake_engine):
    case = CASES[cid]
    before = snapshot(inputs)
    got = run_case(case, inputs, tmp_path)
    assert check_case(case, got) == [], got["stderr"]
    assert snapshot(inputs) == before  # no input touched, no temporary file beside them
    out = tmp_path / cid
    if got["rc"] == 0:  # the fake engine's result is the painted slices, on the image's grid
        painted = case["argv"][case["argv"].index("--labels") + 1].replace("{i}", str(inputs))
        back = vol.read_labels(out / case["outputs"][0], GRID)
        np.testing.assert_array_equal(back.array, vol.read_labels(painted, GRID).array)
        if (out / "r.json").exists():
            report = _strict_json(out / "r.json")
            assert set(report["fit_final_loss"].values()) == {None}  # NaN loss -> null


def test_failed_cases_keep_a_prior_output(inputs, tmp_path, fake_engine):
    got = run_case(CASES["output-kept-when-json-bad"], inputs, tmp_path)
    assert (tmp_path / "output-kept-when-json-bad" / "o.nrrd").read_text() == "user data"
    assert got["rc"] == 2


def test_write_failure_leaves_nothing(inputs, tmp_path, fake_engine, monkeypatch, capfd):
    """A disk that fills up while the report is written: exit 2, neither output, no temp file."""
    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name.startswith(".r.json."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    argv = seg(str(inputs / "img.nrrd"), str(inputs / "lab.nrrd"), str(tmp_path / "o.nrrd"))
    assert cli.main([*argv, "--json", str(tmp_path / "r.json")]) == 2
    err = capfd.readouterr().err.strip()
    assert (
        err.count("\n") == 0 and "No space left on device" in err and "nothing was written" in err
    )
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_while_writing_cleans_up(sig, inputs, tmp_path, fake_engine, monkeypatch, capfd):
    """SIGTERM (timeout, schedulers) or Ctrl-C arriving mid-write: 143 / 130, the previous
    output kept, no temporary file left (it used to stay behind as a 0-byte file)."""
    real = vol._save_labels

    def save_then_signal(path, *args):
        real(path, *args)
        assert path.name.startswith(".o.nrrd.") and path.stat().st_size > 0
        os.kill(os.getpid(), sig)
        time.sleep(1)  # the handler raises here
        raise AssertionError("the signal did not interrupt the write")

    monkeypatch.setattr(vol, "_save_labels", save_then_signal)
    (tmp_path / "o.nrrd").write_text("user data")
    argv = seg(str(inputs / "img.nrrd"), str(inputs / "lab.nrrd"), str(tmp_path / "o.nrrd"))
    assert cli.main([*argv, "--json", str(tmp_path / "r.json")]) == 128 + sig
    err = capfd.readouterr().err.strip()
    assert (
        err.count("\n") == 0 and ("terminated" if sig == signal.SIGTERM else "interrupted") in err
    )
    assert os.listdir(tmp_path) == ["o.nrrd"]
    assert (tmp_path / "o.nrrd").read_text() == "user data"
    assert signal.getsignal(signal.SIGTERM) is not cli._raise_interrupted  # handlers restored


def test_help_names_the_exit_codes():
    assert "143" in cli.build_parser().format_help()


# ------------------------------------------------------------------ real runs, real signals


def _spawn(argv: list[str]) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("oflsam2")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "oflsam2.cli"]
    return subprocess.Popen(
        [*cmd, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize(
    ("sig", "delay"),
    [(signal.SIGINT, 1.0), (signal.SIGTERM, 1.0), (signal.SIGTERM, 6.0)],
    ids=["SIGINT-imports", "SIGTERM-imports", "SIGTERM-engine"],
)
def test_signal_ends_a_real_run_cleanly(sig, delay, inputs, tmp_path):
    """A real run (random-init SAM2, the cheapest path), signalled while it imports and while
    the engine works: one line, 130 / 143, the old output kept, nothing left behind."""
    (tmp_path / "o.nrrd").write_text("user data")
    before = snapshot(inputs)
    argv = seg(str(inputs / "img.nrrd"), str(inputs / "lab.nrrd"), str(tmp_path / "o.nrrd"))
    proc = _spawn([*argv, "--json", str(tmp_path / "r.json")])
    time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal (a very fast machine)")
    assert proc.returncode == 128 + sig, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert os.listdir(tmp_path) == ["o.nrrd"]
    assert (tmp_path / "o.nrrd").read_text() == "user data"
    assert snapshot(inputs) == before


# ------------------------------------------------------------------ the pieces


def test_itk_reason_of_a_truncated_nrrd(inputs):
    with pytest.raises(InputError) as exc:
        vol.read_image(inputs / "trunc.nrrd")
    msg = str(exc.value)
    assert msg.startswith(f"cannot read image {inputs / 'trunc.nrrd'}: the file holds 9")
    assert "% of the expected data (" in msg and "\n" not in msg


def test_header_checked_before_allocation(inputs, monkeypatch):
    monkeypatch.setattr(vol, "available_memory", lambda: 2**30)
    with pytest.raises(InputError, match=r"1\.78 PiB to load, more than half the 1 GiB"):
        vol.read_image(inputs / "huge.nrrd")
    monkeypatch.setattr(vol, "available_memory", lambda: 1000)
    with pytest.raises(InputError, match=r"1\.88 KiB to load"):
        vol.read_image(inputs / "img.nrrd")


def test_check_finite():
    vol.check_finite(np.arange(5), "x")
    vol.check_finite(np.array([1.0, 2.0], np.float32), "x")
    with pytest.raises(InputError, match="x has 2 non-finite voxels"):
        vol.check_finite(np.array([np.nan, 1.0, -np.inf]), "x")
    with pytest.raises(InputError, match="beyond the float32 range"):
        vol.check_finite(np.array([1e39, 0.0]), "x")


def _slab(shape=(20, 30, 30)) -> np.ndarray:
    return np.zeros(shape, np.uint8)


def test_mixed_axes_finds_a_stroke_on_another_axis():
    lab = _slab()
    k, j, i = np.mgrid[:20, :30, :30]
    ball = (k - 10) ** 2 / 40 + (j - 15) ** 2 / 60 + (i - 15) ** 2 / 60 < 1
    for s in (5, 10, 15):
        lab[s][ball[s]] = 1
    assert vol.mixed_axes(lab) is None  # axial slices only
    assert vol.find_annotated(lab, painting=True).axis == 0
    lab[4:17, 15, 10:20] = 1  # one coronal stroke across them
    assert vol.mixed_axes(lab) == (0, 1)
    with pytest.raises(InputError, match=r"two axes, 0 \(k\) and 1 \(j\)"):
        vol.find_annotated(lab, painting=True)
    assert vol.find_annotated(lab, 0, painting=True).axis == 0  # a named axis is trusted
    assert vol.find_annotated(lab).axis in (0, 1, 2)  # the engine's own call is unchanged


def test_mixed_axes_accepts_paintings_on_one_axis():
    lab = _slab()
    lab[7, 5:12, 3:10] = 1  # two separate structures on the same slices (gap along i)
    lab[7, 5:12, 20:27] = 2
    lab[12, 6:11, 4:9] = 1
    lab[12, 6:11, 21:26] = 2
    assert vol.mixed_axes(lab) is None
    lab[13] = lab[12]  # adjacent painted slices
    assert vol.mixed_axes(lab) is None
    one = _slab()
    one[3, 4:9, 4:9] = 5  # a single slice
    assert vol.mixed_axes(one) is None
    assert vol.find_annotated(one, painting=True).slices == [3]
    ann = vol.find_annotated(lab, painting=True)
    assert (ann.axis, ann.slices, ann.per_segment) == (
        0,
        [7, 12, 13],
        {1: [7, 12, 13], 2: [7, 12, 13]},
    )


def test_every_slice_labelled_is_refused():
    lab = _slab((4, 10, 10))
    lab[:, 1:9, 1:9] = 1
    with pytest.raises(InputError, match="labels are on all 4 slices along axis 0"):
        vol.find_annotated(lab, painting=True)
    with pytest.raises(InputError, match="nothing is left to propagate"):
        vol.find_annotated(lab, 0, [0, 1, 2, 3], painting=True)


def test_grid_differences_print_plain_numbers():
    a = vol.Geometry((4, 4, 4), (1.0, 1.0, 3.0), (0.5, 0.0, -2.25))
    b = vol.Geometry((4, 4, 4), (1.0, 1.0, 2.0), (10.5, 0.0, -2.25))
    text = "; ".join(a.differences(b))
    assert (
        text
        == "spacing (1, 1, 2) vs (1, 1, 3); origin (10.5, 0, -2.25) vs (0.5, 0, -2.25) (10 mm apart)"
    )


def test_itk_warnings_stay_off_stderr(inputs, capfd):
    with pytest.raises(InputError, match="holds no DICOM series"):
        vol.read_image(inputs / "junk_dir")
    with pytest.raises(InputError, match="empty_dir is empty"):
        vol.read_image(inputs / "empty_dir")
    assert capfd.readouterr().err == ""


def test_check_writable(tmp_path):
    assert files.check_writable(tmp_path / "a.nrrd", "out") == tmp_path / "a.nrrd"
    with pytest.raises(InputError, match="is a folder"):
        files.check_writable(tmp_path, "out")
    with pytest.raises(InputError, match="does not exist: create"):
        files.check_writable(tmp_path / "no" / "a.nrrd", "out")
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is not a folder"):
        files.check_writable(tmp_path / "f" / "a.nrrd", "out")
    with pytest.raises(InputError, match="not a regular file"):
        files.check_writable("/dev/null", "out")
    assert sorted(os.listdir(tmp_path)) == ["f"]  # the probe left nothing


def test_check_writable_permissions(tmp_path):
    """A read-only folder or file is refused. As root (CI) permission bits do not stop writes,
    so the two are made immutable (chattr +i), which stops root too."""
    import subprocess

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    locked = tmp_path / "locked.nrrd"
    locked.write_text("x")
    locked.chmod(0o444)
    root = os.geteuid() == 0
    if root:
        subprocess.run(["chattr", "+i", str(ro), str(locked)], check=True)
    try:
        with pytest.raises(InputError, match="cannot write out"):
            files.check_writable(ro / "a.nrrd", "out")
        with pytest.raises(InputError, match="is read-only"):
            files.check_writable(locked, "out")
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(ro), str(locked)], check=True)
        ro.chmod(0o755)


def test_atomic_paths_all_or_none(tmp_path):
    (tmp_path / "a.txt").write_text("old a")
    with (
        pytest.raises(RuntimeError),
        files.atomic_paths([tmp_path / "a.txt", tmp_path / "b.json"]) as tmp,
    ):
        tmp[0].write_text("new a")
        raise RuntimeError("the second one failed")
    assert os.listdir(tmp_path) == ["a.txt"] and (tmp_path / "a.txt").read_text() == "old a"
    with files.atomic_paths([tmp_path / "a.txt", tmp_path / "b.json"]) as tmp:
        tmp[0].write_text("new a")
        tmp[1].write_text("{}")
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.json"]
    assert (tmp_path / "a.txt").read_text() == "new a"


def test_same_file(tmp_path):
    (tmp_path / "a").write_text("x")
    (tmp_path / "l").symlink_to("a")
    assert files.same_file(tmp_path / "a", tmp_path / "l")
    assert files.same_file(tmp_path / "a", tmp_path / "sub" / ".." / "a")
    assert not files.same_file(tmp_path / "a", tmp_path / "b")
    assert files.same_file(tmp_path / "b", tmp_path / "." / "b")  # neither exists yet


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_a_swallowed_signal_still_stops_the_run(inputs, tmp_path, monkeypatch, capfd):
    """Some libraries catch every exception while they import; the signal must not be lost."""

    def build_swallowing(settings, n_slices, quiet):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        except BaseException:  # noqa: BLE001 - what such a library does
            pass
        return FakeSegmenter(settings)

    monkeypatch.setattr(cli_segment, "build_segmenter", build_swallowing)
    argv = seg(str(inputs / "img.nrrd"), str(inputs / "lab.nrrd"), str(tmp_path / "o.nrrd"))
    assert cli.main(argv) == 143
    assert "terminated (SIGTERM)" in capfd.readouterr().err
    assert os.listdir(tmp_path) == []


def test_read_only_output_is_refused(tmp_path, monkeypatch):
    """An existing output the user cannot write is refused, not replaced by a rename (root
    can write anything, so the check is shown with os.access answering as for a user)."""
    locked = tmp_path / "o.nrrd"
    locked.write_text("user data")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    with pytest.raises(InputError, match="is read-only"):
        files.check_writable(locked, "--output")
    assert locked.read_text() == "user data"
