"""Accuracy benchmark: how well each method fills a volume from K painted slices.

On the CT that ships in the ``slicerio`` wheel (34 x 128 x 128, 7 segments), each segment
is "painted" on K slices chosen by :func:`oflsam2.baselines.choose_slices` along the axial
axis (array axis 0), and each method fills in the rest. Reported per method, segment and K:

- ``dice_unpainted``: Dice over the voxels of all slices that were not painted, taken
  together (the 3D Dice restricted to the unpainted slices; false positives on slices
  outside the structure count). Painted slices are copied by every method, so they would
  only flatter the score.
- ``dice_volume``: the 3D Dice over the whole volume.
- ``hd95_mm``: 95th percentile symmetric surface distance over the whole volume, in mm.
- ``seconds``: wall time of the method for that case (Fill between slices: its one
  child process, ITK import included, shared out over the cases).

Usage: ``python bench/accuracy.py [--methods ...] [--segments 5,6,3] [--k 2,3,5] [--csv PATH]``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from baselines_litemedsam import litemedsam_box  # bench/, on sys.path when run as a script

from oflsam2.baselines import choose_slices, fill_between_slices_many, nearest_slice
from oflsam2.errors import first_line
from oflsam2.metrics import dice, hd95
from oflsam2.volume import Geometry, intensity_window, read_image, read_labels

AXIS = 0
MIN_SLICES = 6
# Reference numbers measured before this benchmark was written, with the same protocol:
# mean Dice on unpainted slices over right lung, left lung and thoracic spine, K = 2 / 3 / 5.
# The report prints them in brackets so that a change in a baseline shows.
REFERENCE_SEGMENTS = (5, 6, 3)
REFERENCE = {
    "fill_between_slices": (0.668, 0.802, 0.836),
    "nearest_slice_between": (0.629, 0.775, 0.794),
    "litemedsam_box": (0.654, 0.639, 0.642),
}
BASELINES = ("fill_between_slices", "nearest_slice", "nearest_slice_between", "litemedsam_box")
ENGINE = {
    # name: (OFLSegmenter keyword arguments, label shown in the table)
    "oflsam2_litemedsam": (dict(backbone="litemedsam", online=True), "OFL-SAM2, LiteMedSAM"),
    "oflsam2_litemedsam_noonline": (
        dict(backbone="litemedsam", online=False),
        "OFL-SAM2, LiteMedSAM, no online learning",
    ),
    "oflsam2_sam2_random": (
        dict(backbone="sam2", random_init=True),
        "OFL-SAM2, SAM2 RANDOM WEIGHTS (mechanics only, not accuracy)",
    ),
}
METHODS = BASELINES + tuple(ENGINE)
DEFAULT_CSV = Path(__file__).resolve().parent / "results" / "accuracy.csv"


@dataclass
class Case:
    segment: int
    name: str
    k: int
    slices: list[int]
    truth: np.ndarray  # bool (k, j, i)
    sparse: np.ndarray  # uint8, the segment's value on the painted slices


@dataclass
class Row:
    method: str
    segment: int
    name: str
    k: int
    slices: list[int]
    dice_unpainted: float
    dice_volume: float
    hd95_mm: float
    seconds: float


def load_ct():
    """The slicerio CT and its 7-segment label map, on the same grid."""
    import slicerio

    volume = read_image(slicerio.get_testdata_file("CTChest4.nrrd"))
    labels = read_labels(slicerio.get_testdata_file("Segmentation.seg.nrrd"), volume.geometry)
    return volume, labels


def default_segments(labels: np.ndarray) -> list[int]:
    """Every segment spanning at least MIN_SLICES slices along the axis (here: all 7)."""
    other = tuple(a for a in range(3) if a != AXIS)
    return [
        int(v)
        for v in np.unique(labels)
        if v and np.count_nonzero(np.any(labels == v, axis=other)) >= MIN_SLICES
    ]


def make_cases(
    labels: np.ndarray, names: dict[int, str], segments: list[int], ks: list[int]
) -> list[Case]:
    cases = []
    for value in segments:
        truth = labels == value
        for k in ks:
            slices = choose_slices(truth, AXIS, k)
            sparse = np.zeros(labels.shape, np.uint8)
            idx = [slice(None)] * 3
            idx[AXIS] = slices
            sparse[tuple(idx)] = truth[tuple(idx)].astype(np.uint8) * value
            cases.append(Case(value, names.get(value, str(value)), k, slices, truth, sparse))
    return cases


def score(method: str, case: Case, pred: np.ndarray, spacing_kji, seconds: float) -> Row:
    mask = np.asarray(pred) == case.segment
    unpainted = [t for t in range(mask.shape[AXIS]) if t not in case.slices]
    a = np.take(mask, unpainted, axis=AXIS)
    b = np.take(case.truth, unpainted, axis=AXIS)
    return Row(
        method,
        case.segment,
        case.name,
        case.k,
        case.slices,
        dice(a, b),
        dice(mask, case.truth),
        hd95(mask, case.truth, spacing_kji),
        seconds,
    )


# ---------------------------------------------------------------- methods


def run_fill_between(
    cases: list[Case], array, geometry: Geometry, spacing_kji, device
) -> list[np.ndarray]:
    return fill_between_slices_many([c.sparse for c in cases], AXIS, spacing_kji)


def run_nearest(cases, array, geometry, spacing_kji, device) -> list[np.ndarray]:
    return [nearest_slice(c.sparse, AXIS, c.slices) for c in cases]


def run_nearest_between(cases, array, geometry, spacing_kji, device) -> list[np.ndarray]:
    return [nearest_slice(c.sparse, AXIS, c.slices, between_only=True) for c in cases]


def _timed_each(
    fn: Callable[[Case], np.ndarray], cases: list[Case]
) -> tuple[list[np.ndarray], list[float]]:
    preds, secs = [], []
    for case in cases:
        t0 = time.perf_counter()
        preds.append(fn(case))
        secs.append(time.perf_counter() - t0)
    return preds, secs


def run_litemedsam_box(cases, array, geometry, spacing_kji, device):
    from oflsam2.backbones.litemedsam import LiteMedSAMBackbone

    backbone = LiteMedSAMBackbone(device=device)
    caches: dict = {}  # one embedding cache per window: encoding dominates

    def one(case: Case) -> np.ndarray:
        # The window a user's tool would pick from the painted voxels alone.
        window = intensity_window(array, None, case.sparse > 0)
        cache = caches.setdefault(window, {})
        return litemedsam_box(
            array, case.sparse, AXIS, case.slices, backbone, window=window, cache=cache
        )

    return _timed_each(one, cases)


def engine_available() -> bool:
    try:
        from oflsam2.segmenter import OFLSegmenter  # noqa: F401
    except ImportError:
        return False
    return True


def run_engine(method: str):
    kwargs, _ = ENGINE[method]

    def run(cases, array, geometry, spacing_kji, device):
        from oflsam2.segmenter import OFLSegmenter
        from oflsam2.settings import Settings

        def one(case: Case) -> np.ndarray:
            # A fresh segmenter per case: fit() warm-starts a segment's learner on a second
            # call, which would leak the previous case's painted slices into this one.
            seg = OFLSegmenter(Settings(device=device, image_size=512, seed=0, **kwargs))
            seg.set_volume(array, geometry, modality=None)
            seg.fit(case.sparse, slices=case.slices, axis=AXIS)
            return seg.propagate().labels

        return _timed_each(one, cases)

    return run


RUNNERS = {
    "fill_between_slices": run_fill_between,
    "nearest_slice": run_nearest,
    "nearest_slice_between": run_nearest_between,
    "litemedsam_box": run_litemedsam_box,
    **{m: run_engine(m) for m in ENGINE},
}


# ---------------------------------------------------------------- report


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.3f}" if x < 10 else f"{x:.1f}"


def mean_rows(rows: list[Row]) -> list[tuple[str, int, int, float, float, float, float]]:
    """(method, K, number of segments, mean Dice unpainted, mean Dice volume, mean HD95, mean s)."""
    out = []
    for method in dict.fromkeys(r.method for r in rows):
        for k in sorted({r.k for r in rows if r.method == method}):
            sel = [r for r in rows if r.method == method and r.k == k]
            out.append(
                (
                    method,
                    k,
                    len(sel),
                    float(np.mean([r.dice_unpainted for r in sel])),
                    float(np.mean([r.dice_volume for r in sel])),
                    float(np.mean([r.hd95_mm for r in sel])),
                    float(np.mean([r.seconds for r in sel])),
                )
            )
    return out


def print_report(rows: list[Row], unavailable: dict[str, str]) -> None:
    header = f"{'method':<30} {'segment':<28} {'K':>2} {'slices':<18} {'Dice unp':>8} {'Dice vol':>8} {'HD95 mm':>8} {'s':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        name = f"{r.segment} {r.name}"[:28]
        sl = ",".join(map(str, r.slices))
        print(
            f"{r.method:<30} {name:<28} {r.k:>2} {sl:<18} {r.dice_unpainted:>8.3f} {r.dice_volume:>8.3f} "
            f"{_fmt(r.hd95_mm):>8} {r.seconds:>6.1f}"
        )
    for method, why in unavailable.items():
        print(f"{method:<30} n/a: {why}")
    print()
    print("Mean over segments")
    header = (
        f"{'method':<30} {'K':>2} {'n':>2} {'Dice unp':>8} {'Dice vol':>8} {'HD95 mm':>8} {'s':>6}"
    )
    print(header)
    print("-" * len(header))
    for method, k, n, du, dv, hd, s in mean_rows(rows):
        print(f"{method:<30} {k:>2} {n:>2} {du:>8.3f} {dv:>8.3f} {_fmt(hd):>8} {s:>6.1f}")
    ref_rows = [r for r in rows if r.segment in REFERENCE_SEGMENTS]
    ref_means = [m for m in mean_rows(ref_rows) if m[2] == len(REFERENCE_SEGMENTS)]
    if ref_means:
        print()
        print(
            "Mean Dice on unpainted slices over right lung, left lung, thoracic spine "
            "(earlier reference numbers in brackets)"
        )
        for method, k, _, du, _, _, _ in ref_means:
            ref = REFERENCE.get(method)
            ks = (2, 3, 5)
            note = f" [{ref[ks.index(k)]:.3f}]" if ref and k in ks else ""
            print(f"{method:<30} K={k}: {du:.3f}{note}")
    for method, (_, label) in ENGINE.items():
        if any(r.method == method for r in rows) and "RANDOM" in label:
            print(
                f"\nNOTE: {method} uses SAM2 with RANDOM weights: its numbers say nothing about accuracy."
            )


def write_csv(path: Path, rows: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "method",
                "segment",
                "name",
                "k",
                "slices",
                "dice_unpainted",
                "dice_volume",
                "hd95_mm",
                "seconds",
            ]
        )
        for r in rows:
            w.writerow(
                [
                    r.method,
                    r.segment,
                    r.name,
                    r.k,
                    " ".join(map(str, r.slices)),
                    f"{r.dice_unpainted:.4f}",
                    f"{r.dice_volume:.4f}",
                    "inf" if math.isinf(r.hd95_mm) else f"{r.hd95_mm:.2f}",
                    f"{r.seconds:.2f}",
                ]
            )


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.replace(" ", "").split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}"
    )
    p.add_argument(
        "--segments",
        default=None,
        help=f"label values (default: every segment spanning >= {MIN_SLICES} slices)",
    )
    p.add_argument("--k", default="2,3,5", help="numbers of painted slices")
    p.add_argument("--csv", default=str(DEFAULT_CSV), help="where to write the per-case table")
    p.add_argument("--device", default="cpu", help="device for LiteMedSAM and the engine")
    args = p.parse_args(argv)

    methods = [m for m in args.methods.replace(" ", "").split(",") if m]
    unknown = [m for m in methods if m not in RUNNERS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    volume, labels = load_ct()
    segments = _int_list(args.segments) if args.segments else default_segments(labels.array)
    missing = [s for s in segments if not np.any(labels.array == s)]
    if missing:
        p.error(f"segment(s) {missing} not in the label map; present: {sorted(labels.names)}")
    cases = make_cases(labels.array, labels.names, segments, _int_list(args.k))
    spacing_kji = tuple(volume.geometry.spacing[::-1])

    rows: list[Row] = []
    unavailable: dict[str, str] = {}
    have_engine = engine_available()
    for method in methods:
        if method in ENGINE and not have_engine:
            unavailable[method] = "engine not available"
            continue
        print(f"running {method} on {len(cases)} cases ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            out = RUNNERS[method](cases, volume.array, volume.geometry, spacing_kji, args.device)
        except Exception as exc:  # an engine in flux must not cost the baselines' numbers
            if method not in ENGINE:
                raise
            unavailable[method] = f"error: {type(exc).__name__}: {first_line(exc, 120)}"
            continue
        if isinstance(out, tuple):
            preds, secs = out
        else:  # one batch for all cases: share its time out
            preds = out
            secs = [(time.perf_counter() - t0) / len(cases)] * len(cases)
        rows += [
            score(method, c, pr, spacing_kji, s)
            for c, pr, s in zip(cases, preds, secs, strict=True)
        ]
    print_report(rows, unavailable)
    if rows:
        write_csv(Path(args.csv), rows)
        print(f"\nwrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
