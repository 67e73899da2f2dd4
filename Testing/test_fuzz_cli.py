"""Header fuzzing through the command line (issue 11).

Hundreds of mutated NRRD headers (every field given odd values, removed, doubled, added;
broken magic, line endings and data; random byte flips) and a few dozen mutated NIfTI
headers go through ``oflsam2 segment`` as the image or the label map, together with
every case of test_robust_cli.py. Each must end with exit 0 or 2 and one line, never an
internal error or a traceback, and leave nothing behind: no input touched, no temporary
file, no output unless the run succeeded (then all of them).

All cases run in ONE child process (this file run as a script) that calls
``oflsam2.cli.main`` in-process with the engine replaced by test_robust_cli's
FakeSegmenter, so a mutated file costs milliseconds; a child process also keeps a crash
in a reader from taking pytest down with it. The child writes one JSON line per case
as it goes, so that a crash still names the case.
"""

from __future__ import annotations

import gzip
import json
import random
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import SimpleITK as sitk
from test_robust_cli import GRID, _labels, check_case, issue_cases, make_inputs, seg, snapshot

# ------------------------------------------------------------------ NRRD mutations

_FIELD_VALUES = {
    "type": ["ushort", "uchar", "signed char", "int", "uint", "longlong", "ulonglong", "float",
             "double", "block", "int8", "complex", "", "short short", "ＳＨＯＲＴ"],
    "dimension": ["0", "1", "2", "4", "16", "17", "-3", "3.5", "x", ""],
    "space": ["right-anterior-superior", "RAS", "LPS", "left-posterior-superior-time",
              "3D-right-handed", "scanner-xyz", "mars", ""],
    "sizes": ["12 10", "12 10 8 1", "0 10 8", "12 -10 8", "12 10 100000000000",
              "100000 100000 100000", "4294967297 65536 2", "9223372036854775807 1 1", "12 10 x",
              "12.5 10 8", "", "1 1 1", "12 10 4", "12 10 9", "120 100 80"],
    "space directions": ["(0,0,0) (0,0.9,0) (0,0,2.5)", "(0.8,0,0) (0.8,0,0) (0,0,2.5)",
                         "(nan,0,0) (0,0.9,0) (0,0,2.5)", "(inf,0,0) (0,0.9,0) (0,0,2.5)",
                         "(1e308,0,0) (0,1e308,0) (0,0,1e308)", "(1e-300,0,0) (0,0.9,0) (0,0,2.5)",
                         "(-0.8,0,0) (0,-0.9,0) (0,0,-2.5)", "(0.8,0,0) (0,0.9,0)",
                         "none (0,0.9,0) (0,0,2.5)", "(0.8,0) (0,0.9) (0,0)", "junk", "",
                         "(0.56,0.56,0) (-0.64,0.64,0) (0,0,2.5)", "(1,2,3) (4,5,6) (7,8,9)",
                         "(0.8,0,0,0) (0,0.9,0,0) (0,0,2.5,0)"],
    "kinds": ["domain domain", "space space space", "list domain domain", "RGB-color domain domain",
              "complex domain domain", "vector domain domain", "3-vector domain domain",
              "junk junk junk", ""],
    "endian": ["big", "middle", ""],
    "encoding": ["gzip", "gz", "bzip2", "ascii", "text", "hex", "zip", ""],
    "space origin": ["(nan,0,0)", "(inf,0,0)", "(1e308,1e308,1e308)", "(0,0)", "(0,0,0,0)",
                     "junk", "()", "", "(1e-320,0,0)"],
}  # fmt: skip

_EXTRA_LINES = [
    "spacings: 0.8 0.9 2.5", "spacings: 0 0 0", "spacings: nan 1 1", "thicknesses: 1 1 1",
    "axis mins: 0 0 0", "axis maxs: 1 1 1", "centers: cell cell cell", "centerings: node node node",
    'labels: "x" "y" "z"', "units: mm mm mm", 'space units: "mm" "mm" "mm"', 'space units: "km" "km"',
    "measurement frame: (1,0,0) (0,1,0) (0,0,1)", "measurement frame: junk", "data file: nope.raw",
    "data file: LIST", "data file: ../../../../etc/hostname", "byte skip: -1", "byte skip: 10",
    "byte skip: 999999", "line skip: 3", "block size: 4", "content: é ✓ 𝄞", "min: 0", "max: nan",
    "old min: -1e309", "sample units: HU", "space dimension: 3", "space dimension: 2",
    "0008|0060:=CT", "0008|0060:=MR", "key:=" + "v" * 100_000, "# a comment", "no colon here",
    ": empty field name", "type: short",
]  # fmt: skip


def _split(data: bytes) -> tuple[list[str], bytes]:
    head, _, body = data.partition(b"\n\n")
    return head.decode("latin-1").split("\n"), body


def _join(lines: list[str], body: bytes, newline: str = "\n") -> bytes:
    return (newline.join(lines) + newline + newline).encode("utf-8", "surrogateescape") + body


def _set(lines: list[str], field: str, value: str | None) -> list[str]:
    out = []
    for line in lines:
        if line.startswith(field + ":") and not line.startswith(field + ":="):
            if value is not None:
                out.append(f"{field}: {value}")
        else:
            out.append(line)
    return out


def nrrd_mutants(base: bytes, seed: int = 11) -> list[tuple[str, bytes]]:
    """Mutations of a raw-encoded NRRD, each a (name, file content)."""
    lines, body = _split(base)
    out: list[tuple[str, bytes]] = []
    for field, values in _FIELD_VALUES.items():
        key = field.replace(" ", "_")
        out += [(f"{key}={i}", _join(_set(lines, field, v), body)) for i, v in enumerate(values)]
        out.append((f"{key}-removed", _join(_set(lines, field, None), body)))
        doubled = [ln for ln in lines for ln in ([ln, ln] if ln.startswith(field + ":") else [ln])]
        out.append((f"{key}-twice", _join(doubled, body)))
    out += [(f"extra-{i}", _join([*lines, extra], body)) for i, extra in enumerate(_EXTRA_LINES)]
    out += [(f"magic-{m}", _join([m, *lines[1:]], body)) for m in
            ("NRRD0001", "NRRD0002", "NRRD0003", "NRRD0005", "NRRD0009", "NRRD000", "nrrd0004", "")]  # fmt: skip
    out += [
        ("crlf", _join(lines, body, "\r\n")),
        ("no-blank-line", ("\n".join(lines) + "\n").encode() + body),
        ("two-blank-lines", _join(lines, b"\n" + body)),
        ("data-empty", _join(lines, b"")),
        ("data-half", _join(lines, body[: len(body) // 2])),
        ("data-one-byte-short", _join(lines, body[:-1])),
        ("data-double", _join(lines, body + body)),
        ("data-gzip-but-raw-header", _join(lines, gzip.compress(body))),
        ("header-cut", base[: len(base) - len(body) - 40]),
        ("only-magic", b"NRRD0004\n"),
        ("empty-file", b""),
        ("nul-bytes", b"\0" * len(base)),
        ("utf16", _join(lines, body).decode("latin-1").encode("utf-16")),
    ]
    rng = random.Random(seed)
    head_len = len(base) - len(body)
    for n in range(60):
        data = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(head_len)] = rng.randrange(256)
        out.append((f"flip-{n}", bytes(data)))
    return out


# ------------------------------------------------------------------ NIfTI mutations

_NIFTI_FIELDS = {  # name: (offset, struct format) in the NIfTI-1 header
    "sizeof_hdr": (0, "<i"), "dim0": (40, "<h"), "dim1": (42, "<h"), "dim3": (46, "<h"),
    "dim4": (48, "<h"), "datatype": (70, "<h"), "bitpix": (72, "<h"), "pixdim1": (80, "<f"),
    "pixdim3": (88, "<f"), "vox_offset": (108, "<f"), "scl_slope": (112, "<f"),
    "scl_inter": (116, "<f"), "qform_code": (252, "<h"), "sform_code": (254, "<h"),
    "quatern_b": (256, "<f"), "srow_x0": (280, "<f"),
}  # fmt: skip
_NIFTI_VALUES = [
    ("sizeof_hdr", 0), ("sizeof_hdr", 540), ("dim0", 0), ("dim0", 2), ("dim0", 4), ("dim0", 8),
    ("dim1", 0), ("dim1", -1), ("dim1", 32767), ("dim3", 30000), ("dim4", 0), ("dim4", 2),
    ("datatype", 0), ("datatype", 32), ("datatype", 128), ("datatype", 16), ("datatype", 2048),
    ("bitpix", 0), ("pixdim1", 0.0), ("pixdim1", -1.0), ("pixdim1", float("nan")),
    ("pixdim3", float("inf")), ("vox_offset", 1e9), ("vox_offset", 0.0), ("scl_slope", float("nan")),
    ("scl_slope", float("inf")), ("scl_slope", 1e38), ("scl_inter", float("nan")),
    ("qform_code", 1), ("qform_code", -5), ("sform_code", 0), ("sform_code", 99),
    ("quatern_b", float("nan")), ("quatern_b", 5.0), ("srow_x0", float("nan")), ("srow_x0", 0.0),
]  # fmt: skip


def nifti_mutants(base: bytes) -> list[tuple[str, bytes]]:
    """Mutations of an uncompressed single-file NIfTI-1 (.nii), each a (name, content)."""
    out = []
    for field, value in _NIFTI_VALUES:
        offset, fmt = _NIFTI_FIELDS[field]
        data = bytearray(base)
        struct.pack_into(fmt, data, offset, value)
        out.append((f"{field}={value}", bytes(data)))
    out += [
        ("magic", base[:344] + b"xyz\0" + base[348:]),
        ("truncated", base[: len(base) - 50]),
        ("header-only", base[:352]),
        ("empty", b""),
    ]
    return out


# ------------------------------------------------------------------ the batch


def _write(folder: Path, name: str, data: bytes) -> str:
    safe = "".join(c if c.isalnum() or c in "=-_." else "_" for c in name)[:80]
    (folder / safe).write_bytes(data)
    return safe


def fuzz_cases(inputs: Path) -> list[dict]:
    """The mutated files (written under ``inputs``/fuzz) and a case for each, then every
    case of test_robust_cli."""
    fuzz = inputs / "fuzz"
    fuzz.mkdir()
    sitk.WriteImage(GRID.to_sitk(_labels()), str(inputs / "labraw.nrrd"), useCompression=False)
    image, labels = (inputs / "raw.nrrd").read_bytes(), (inputs / "labraw.nrrd").read_bytes()
    sitk.WriteImage(sitk.ReadImage(str(inputs / "img.nrrd")), str(inputs / "raw.nii"))
    nifti = (inputs / "raw.nii").read_bytes()
    report = ("--json", "{o}/r.json")
    cases = []

    def case(cid, argv, tag):
        cases.append({"id": cid, "argv": argv, "rc": None, "want": None, "pre": {},
                      "outputs": ["o.nrrd", "r.json"], "class": tag})  # fmt: skip

    for name, data in nrrd_mutants(image):
        f = _write(fuzz, f"img-{name}.nrrd", data)
        case(f"img-{name}", seg(f"{{i}}/fuzz/{f}", "{i}/lab.nrrd") + list(report), "NRRD image")
    for name, data in nrrd_mutants(labels, seed=12)[::3]:
        f = _write(fuzz, f"lab-{name}.nrrd", data)
        case(f"lab-{name}", seg(labels=f"{{i}}/fuzz/{f}") + list(report), "NRRD label map")
    for name, data in nrrd_mutants((inputs / "lab.seg.nrrd").read_bytes(), seed=13)[::6]:
        f = _write(fuzz, f"seg-{name}.seg.nrrd", data)
        case(f"seg-{name}", seg(labels=f"{{i}}/fuzz/{f}") + list(report), "Slicer .seg.nrrd")
    for name, data in nifti_mutants(nifti):
        f = _write(fuzz, f"nii-{name}.nii", data)
        case(f"nii-{name}", seg(f"{{i}}/fuzz/{f}") + list(report), "NIfTI image")
        g = _write(fuzz, f"niigz-{name}.nii.gz", gzip.compress(data))
        case(f"niigz-{name}", seg(f"{{i}}/fuzz/{g}") + list(report), "NIfTI image")
    return cases + issue_cases()


def _batch(spec: Path, inputs: Path, results: Path) -> None:
    """In the child: every case through cli.main with the fake engine, one JSON line each."""
    from test_robust_cli import fake_build, run_case

    from oflsam2 import cli_segment

    cli_segment.build_segmenter = fake_build
    outputs = results.parent / "out"
    with results.open("w", encoding="utf-8") as fh:
        for case in json.loads(spec.read_text(encoding="utf-8")):
            fh.write(json.dumps({"id": case["id"], "started": True}) + "\n")
            fh.flush()
            fh.write(json.dumps(run_case(case, inputs, outputs)) + "\n")
            fh.flush()


@pytest.mark.slow
def test_fuzzed_headers_and_every_case(tmp_path):
    inputs = make_inputs(tmp_path / "in")
    cases = fuzz_cases(inputs)
    assert len([c for c in cases if c["class"].startswith("NRRD")]) >= 200
    spec, results = tmp_path / "cases.json", tmp_path / "results.jsonl"
    spec.write_text(json.dumps(cases), encoding="utf-8")
    before = snapshot(inputs)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, str(spec), str(inputs), str(results)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    seconds = time.perf_counter() - t0
    rows = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()]
    done = {r["id"]: r for r in rows if "rc" in r}
    started = [r["id"] for r in rows if "started" in r]
    assert proc.returncode == 0, f"the batch died at {started[-1:]}: {proc.stderr[-3000:]}"
    assert len(done) == len(cases)
    failures = {}
    tally: Counter = Counter()
    handled: Counter = Counter()
    for case in cases:
        got = done[case["id"]]
        problems = check_case(case, got)
        tally[case["class"]] += 1
        handled[case["class"]] += not problems
        if problems:
            failures[case["id"]] = (problems, got["stderr"][-300:])
    table = "\n".join(f"{k:24s} {tally[k]:4d} {handled[k]:4d}" for k in sorted(tally))
    print(
        f"\n{len(cases)} cases in {seconds:.1f} s\nclass                   tried handled\n{table}"
    )
    assert failures == {}
    assert snapshot(inputs) == before  # no input changed, no temporary file beside them
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cases.json",
        "in",
        "out",
        "results.jsonl",
    ]


if __name__ == "__main__":
    _batch(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
