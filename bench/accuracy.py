"""Accuracy benchmark: how well each method fills a volume from K painted slices.

Data and painting patterns: ``bench/cases.py`` (the slicerio chest CT's seven segments, plus
the seven labelled volumes of ``../shared/data/dev`` when present). For every structure,
pattern (``even``, ``ends``, ``cluster``) and K (default 2, 3, 5), the structure alone on its
K painted slices is the sparse input and each method fills in the rest.

Metrics, per case:
- ``dice_unpainted``: the 3D Dice restricted to the slices that were not painted (all their
  voxels taken together, slices outside the structure included, where false positives count).
- ``fp_beyond``: voxels predicted outside the painted range [first, last painted slice], not in
  the structure, as a fraction of the structure's volume (the "ends" pattern's false positives).
- ``seconds``: wall time of the method for that case.

Methods: ``fill_between_slices`` (Slicer's "Fill between slices", ITK in a child process),
``nearest_slice`` (every slice copies the nearest painted one), ``litemedsam_box`` (LiteMedSAM box
prompts walked slice to slice, ``bench/baselines_litemedsam.py``), and engine variants, each
over the seeds given (``--seeds``), in ablation order: ``box_only`` (LiteMedSAM prompted with the
box of the shape interpolated between the painted slices, untrained learner, no walk beyond),
``learner`` (+ the trained learner: its coarse head grows that box where the image says the
structure is larger), ``oflsam2`` (+ the walk beyond the painted range, stopped where the head's
region stops continuing the previous slice: the defaults), ``online`` (+ online learning).
Engine variants of one painting share one segmenter's encoded slices (``OFLSegmenter.reset``),
and variants that differ only in propagation settings share one fit (``OFLSegmenter.retune``,
online learning off): each row is exactly what a fresh run gives. ``--workers N`` runs
paintings in N processes.

Reported: mean Dice on unpainted slices per (pattern, K) for every method; engine rows as mean
± sd over seeds (of the per-seed means); mean ``fp_beyond`` for the ends pattern; a per-case CSV.

Usage: ``python bench/accuracy.py [--data ct,dev] [--patterns even,ends,cluster] [--k 2,3,5]
[--methods ...] [--seeds 0,1,2] [--structures NAME,...] [--csv PATH]``.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import (  # noqa: E402
    AXIS,
    PATTERNS,
    Volume,
    in_processes,
    load_ct,
    load_dev,
    paint_slices,
    structures,
)

from oflsam2.metrics import dice  # noqa: E402

BASELINES = ("fill_between_slices", "nearest_slice", "litemedsam_box")
# Engine variants: Settings changes from the defaults (LiteMedSAM backbone), in ablation order.
ENGINE = {
    "box_only": dict(fit_steps=0, extend=False, inside="interp"),
    "learner": dict(extend=False),
    "oflsam2": dict(),
    "online": dict(online=True),
}
METHODS = BASELINES + tuple(ENGINE)
DEFAULT_CSV = Path(__file__).resolve().parent / "results" / "accuracy.csv"


@dataclass
class Case:
    volume: Volume
    value: int
    pattern: str
    k: int
    slices: list[int]
    truth: np.ndarray = field(repr=False)  # bool (k, j, i)
    sparse: np.ndarray = field(repr=False)  # uint8: the structure on its painted slices

    @property
    def structure(self) -> str:
        return f"{self.volume.name}:{self.volume.structures[self.value]}"


@dataclass
class Row:
    method: str
    seed: int | None
    structure: str
    pattern: str
    k: int
    slices: list[int]
    dice_unpainted: float
    fp_beyond: float
    seconds: float


def make_cases(volumes: list[Volume], patterns, ks, only: set[str] | None) -> list[Case]:
    out = []
    for volume in volumes:
        for value in structures(volume):
            truth = volume.labels == value
            name = f"{volume.name}:{volume.structures[value]}"
            if only and not ({name, volume.name, volume.structures[value]} & only):
                continue
            for pattern in patterns:
                for k in ks:
                    slices = paint_slices(truth, pattern, k)
                    sparse = np.zeros(truth.shape, np.uint8)
                    sparse[slices] = truth[slices].astype(np.uint8) * value
                    out.append(Case(volume, value, pattern, k, slices, truth, sparse))
    return out


def score(method: str, seed: int | None, case: Case, pred: np.ndarray, seconds: float) -> Row:
    mask = np.asarray(pred) == case.value
    n = mask.shape[AXIS]
    unpainted = [t for t in range(n) if t not in case.slices]
    outside = [t for t in range(n) if t < case.slices[0] or t > case.slices[-1]]
    fp = np.count_nonzero(mask[outside] & ~case.truth[outside]) if outside else 0
    return Row(
        method,
        seed,
        case.structure,
        case.pattern,
        case.k,
        case.slices,
        dice(mask[unpainted], case.truth[unpainted]),
        fp / max(1, int(np.count_nonzero(case.truth))),
        seconds,
    )


# ---------------------------------------------------------------- methods


def run_fill_between(cases: list[Case], device: str) -> list[Row]:
    from oflsam2.baselines import fill_between_slices_many

    rows = []
    for name in dict.fromkeys(c.volume.name for c in cases):  # one child process per volume
        sel = [c for c in cases if c.volume.name == name]
        t0 = time.perf_counter()
        spacing = tuple(sel[0].volume.geometry.spacing[::-1])
        preds = fill_between_slices_many([c.sparse for c in sel], AXIS, spacing)
        each = (time.perf_counter() - t0) / len(sel)
        rows += [
            score("fill_between_slices", None, c, p, each) for c, p in zip(sel, preds, strict=True)
        ]
    return rows


def run_nearest(cases: list[Case], device: str) -> list[Row]:
    from oflsam2.baselines import nearest_slice

    rows = []
    for c in cases:
        t0 = time.perf_counter()
        pred = nearest_slice(c.sparse, AXIS, c.slices)
        rows.append(score("nearest_slice", None, c, pred, time.perf_counter() - t0))
    return rows


def run_box_walk(cases: list[Case], device: str) -> list[Row]:
    from baselines_litemedsam import litemedsam_box

    from oflsam2.backbones.litemedsam import LiteMedSAMBackbone
    from oflsam2.volume import intensity_window

    backbone = LiteMedSAMBackbone(device=device)
    caches: dict = {}  # per volume and window: encoding dominates
    rows = []
    for c in cases:
        t0 = time.perf_counter()
        window = intensity_window(c.volume.array, c.volume.modality, c.sparse > 0)
        cache = caches.setdefault((c.volume.name, window), {})
        pred = litemedsam_box(
            c.volume.array, c.sparse, AXIS, c.slices, backbone, window=window, cache=cache
        )
        rows.append(score("litemedsam_box", None, c, pred, time.perf_counter() - t0))
    return rows


def cached_segmenter(folder: Path | None):
    """OFLSegmenter, or (benchmark only) one that keeps encoded slices on disk across runs.

    The features of a slice depend on the volume, the slice axis, the crop and the window only,
    so re-running the benchmark after a change of the learner or the propagation re-encodes
    nothing. Stored as float16 ``.npy`` (no pickle); delete the folder after a backbone change.
    """
    import torch

    from oflsam2.segmenter import OFLSegmenter

    if folder is None:
        return OFLSegmenter

    class Cached(OFLSegmenter):
        volume_name = ""

        def _features(self, slices, progress=None):
            roi, window = self.roi, self.window
            key = f"{self.volume_name}_{self.backbone.name}_{self.backbone.input_size}_a{self.annotation.axis}"
            key += f"_r{roi.r0}_{roi.c0}_{roi.side}_w{window[0]:.4g}_{window[1]:.4g}"
            where = folder / key
            missing = []
            for t in slices:
                if t in self._cache:
                    continue
                files = sorted(where.glob(f"s{t:04d}_*.npy"))
                if files:
                    arrays = [torch.from_numpy(np.load(f, allow_pickle=False)) for f in files]
                    self._cache[t] = (arrays[0], arrays[1:])
                else:
                    missing.append(t)
            super()._features(missing, progress)
            where.mkdir(parents=True, exist_ok=True)
            for t in missing:
                embed, hires = self._cache[t]
                for j, a in enumerate([embed, *hires]):
                    tmp = where / f".s{t:04d}_{j}.{os.getpid()}.npy"  # parallel workers
                    np.save(tmp, a.numpy())
                    os.replace(tmp, where / f"s{t:04d}_{j}.npy")

    return Cached


def run_engine(
    cases: list[Case], device: str, variants: list[str], seeds: list[int], store: Path | None
) -> list[Row]:
    """Each painting: one segmenter (one encoding), reset for every variant and seed."""
    from oflsam2.settings import Settings

    factory = cached_segmenter(store)
    rows = []
    for c in cases:
        print(f"  engine: {c.structure} {c.pattern} K={c.k}", file=sys.stderr, flush=True)
        seg = None
        for seed in seeds:
            fitted, fit_seconds = None, 0.0
            for variant in variants:
                settings = Settings(device=device, seed=seed, **ENGINE[variant])
                t0 = time.perf_counter()
                if seg is None:
                    seg = factory(settings)
                    seg.volume_name = c.volume.name
                    seg.set_volume(c.volume.array, c.volume.geometry, c.volume.modality)
                share = not settings.online and fitted == settings.fit_key()
                if share:  # same learners: propagate only (exactly what a refit gives)
                    seg.retune(settings)
                else:
                    seg.reset(settings)
                    seg.fit(c.sparse, slices=c.slices, axis=AXIS)
                    fit_seconds = time.perf_counter() - t0
                    fitted = None if settings.online else settings.fit_key()
                pred = seg.propagate().labels
                seconds = time.perf_counter() - t0 + (fit_seconds if share else 0.0)
                rows.append(score(variant, seed, c, pred, seconds))
    return rows


def _engine_task(case: Case, job: tuple) -> list[Row]:
    """Engine rows of one painting (``cases.in_processes`` runs it, maybe in a fork)."""
    device, variants, seeds, store, threads = job
    if threads:
        import torch

        torch.set_num_threads(threads)
    return run_engine([case], device, variants, seeds, store)


# ---------------------------------------------------------------- report


def table(rows: list[Row], methods: list[str], patterns, ks) -> list[str]:
    """Markdown: one line per (pattern, K), one column per method; engine: mean ± sd over seeds."""
    head = "| pattern | K | n | " + " | ".join(methods) + " |"
    lines = [head, "|" + "---|" * (3 + len(methods))]
    for pattern in patterns:
        for k in ks:
            sel = [r for r in rows if r.pattern == pattern and r.k == k]
            if not sel:
                continue
            n = len({r.structure for r in sel})
            cells = [_cell([r for r in sel if r.method == m], "dice_unpainted") for m in methods]
            lines.append(f"| {pattern} | {k} | {n} | " + " | ".join(cells) + " |")
    return lines


def targets(rows: list[Row], patterns, ks, engine: str = "oflsam2") -> list[str]:
    """Issue 10's targets: the engine's mean >= 1.05 x the best baseline per (pattern, K); at
    K = 5 no structure more than 0.05 under Fill between slices; ends: fp_beyond <= 2 %."""
    lines = ["| pattern | K | best baseline | target (x 1.05) | " + engine + " | met |"]
    lines.append("|---|---|---|---|---|---|")
    for pattern in patterns:
        for k in ks:
            sel = [r for r in rows if r.pattern == pattern and r.k == k]
            ours = [r.dice_unpainted for r in sel if r.method == engine]
            base = {
                m: np.mean([r.dice_unpainted for r in sel if r.method == m])
                for m in BASELINES
                if any(r.method == m for r in sel)
            }
            if not ours or not base:
                continue
            best = max(base, key=base.get)
            goal, mean = 1.05 * base[best], float(np.mean(ours))
            lines.append(
                f"| {pattern} | {k} | {base[best]:.3f} ({best}) | {goal:.3f} | {mean:.3f} | "
                f"{'yes' if mean >= goal else 'no'} |"
            )
    worse = []
    for r in rows:
        if r.method == engine and r.k == 5:
            fill = [x for x in rows if x.method == "fill_between_slices" and _same(x, r)]
            if fill and r.dice_unpainted < fill[0].dice_unpainted - 0.05:
                worse.append(
                    f"{r.structure} {r.pattern} ({r.dice_unpainted:.3f} vs "
                    f"{fill[0].dice_unpainted:.3f})"
                )
    lines.append("")
    lines.append(f"K = 5, more than 0.05 under Fill between slices: {', '.join(worse) or 'none'}")
    ends = [r.fp_beyond for r in rows if r.method == engine and r.pattern == "ends"]
    if ends:
        lines.append(
            f"ends: voxels added beyond the painted ends: {100 * np.mean(ends):.2f} % of "
            "the structure on average (target <= 2 %)"
        )
    return lines


def _same(a: Row, b: Row) -> bool:
    return (a.structure, a.pattern, a.k) == (b.structure, b.pattern, b.k)


def _cell(rows: list[Row], metric: str) -> str:
    if not rows:
        return "n/a"
    seeds = sorted({r.seed for r in rows}, key=lambda s: -1 if s is None else s)
    means = [float(np.mean([getattr(r, metric) for r in rows if r.seed == s])) for s in seeds]
    if len(means) == 1:
        return f"{means[0]:.3f}"
    return f"{np.mean(means):.3f} ± {np.std(means):.3f}"


def per_structure(rows: list[Row], methods: list[str], pattern: str, k: int) -> list[str]:
    lines = ["| structure | " + " | ".join(methods) + " |", "|" + "---|" * (1 + len(methods))]
    sel = [r for r in rows if r.pattern == pattern and r.k == k]
    for name in dict.fromkeys(r.structure for r in sel):
        cells = [
            _cell([r for r in sel if r.structure == name and r.method == m], "dice_unpainted")
            for m in methods
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def write_csv(path: Path, rows: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "method",
                "seed",
                "structure",
                "pattern",
                "k",
                "slices",
                "dice_unpainted",
                "fp_beyond",
                "seconds",
            ]
        )
        for r in rows:
            w.writerow(
                [
                    r.method,
                    "" if r.seed is None else r.seed,
                    r.structure,
                    r.pattern,
                    r.k,
                    " ".join(map(str, r.slices)),
                    f"{r.dice_unpainted:.4f}",
                    f"{r.fp_beyond:.4f}",
                    f"{r.seconds:.2f}",
                ]
            )


def read_csv(path: Path) -> list[Row]:
    with open(path, newline="") as fh:
        return [
            Row(
                d["method"],
                int(d["seed"]) if d["seed"] else None,
                d["structure"],
                d["pattern"],
                int(d["k"]),
                [int(x) for x in d["slices"].split()],
                float(d["dice_unpainted"]),
                float(d["fp_beyond"]),
                float(d["seconds"]),
            )
            for d in csv.DictReader(fh)
        ]


def report(rows: list[Row], patterns, ks) -> None:
    methods = list(dict.fromkeys(r.method for r in rows))
    print("Mean Dice on unpainted slices")
    print("\n".join(table(rows, methods, patterns, ks)))
    if "oflsam2" in methods:
        print("\nTargets")
        print("\n".join(targets(rows, patterns, ks)))
    ends = [r for r in rows if r.pattern == "ends"]
    if ends:
        print("\nends pattern: false-positive voxels outside the painted range / structure volume")
        for m in methods:
            sel = [r for r in ends if r.method == m]
            if sel:
                print(f"  {m:<22} {np.mean([r.fp_beyond for r in sel]):.4f}")
    for k in ks:
        if any(r.k == k for r in rows):
            for pattern in patterns:
                if any(r.k == k and r.pattern == pattern for r in rows):
                    print(f"\nPer structure, {pattern}, K = {k}")
                    print("\n".join(per_structure(rows, methods, pattern, k)))


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="ct,dev", help="ct, dev or both")
    p.add_argument("--patterns", default=",".join(PATTERNS))
    p.add_argument("--k", default="2,3,5")
    p.add_argument("--methods", default=",".join(METHODS), help=", ".join(METHODS))
    p.add_argument("--seeds", default="0,1,2", help="seeds of the engine rows")
    p.add_argument("--structures", default="", help="volume or structure names to keep")
    p.add_argument("--csv", default=str(DEFAULT_CSV))
    p.add_argument("--append", action="store_true", help="add to the rows already in --csv")
    p.add_argument("--report-only", action="store_true", help="print the tables of --csv")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    p.add_argument("--workers", type=int, default=1, help="processes running engine paintings")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="an extra engine variant, e.g. grow1='{\"evidence_grow\": 1}'",
    )
    p.add_argument("--feature-cache", default="", help="folder keeping encoded slices across runs")
    args = p.parse_args(argv)
    patterns, ks = _list(args.patterns), [int(k) for k in _list(args.k)]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.report_only:
        report(read_csv(Path(args.csv)), patterns, ks)
        return 0
    import json

    for spec in args.variant:
        name, _, text = spec.partition("=")
        ENGINE[name] = json.loads(text)
    methods = _list(args.methods)
    unknown = [m for m in methods if m not in BASELINES and m not in ENGINE]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    data = _list(args.data)
    volumes = ([load_ct()] if "ct" in data else []) + (load_dev() if "dev" in data else [])
    if "dev" in data and not any(v.name != "ct_chest" for v in volumes):
        print("note: ../shared/data/dev not found; the sample CT only", file=sys.stderr)
    cases = make_cases(volumes, patterns, ks, set(_list(args.structures)) or None)
    rows: list[Row] = read_csv(Path(args.csv)) if args.append and Path(args.csv).exists() else []
    runners = {
        "fill_between_slices": run_fill_between,
        "nearest_slice": run_nearest,
        "litemedsam_box": run_box_walk,
    }
    for method in [m for m in methods if m in runners]:
        print(f"running {method} on {len(cases)} cases ...", file=sys.stderr, flush=True)
        rows += runners[method](cases, args.device)
        write_csv(Path(args.csv), rows)
    variants = [m for m in methods if m in ENGINE]
    if variants:
        seeds = [int(s) for s in _list(args.seeds)]
        store = Path(args.feature_cache) if args.feature_cache else None
        print(f"running {', '.join(variants)} on {len(cases)} cases ...", file=sys.stderr)
        job = (args.device, variants, seeds, store, args.threads)
        for done in in_processes(_engine_task, cases, job, args.workers):  # saved as they come
            rows += done
            write_csv(Path(args.csv), rows)
    report(rows, patterns, ks)
    print(f"\nwrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
