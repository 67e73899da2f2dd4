"""Transfer benchmark: what a learner trained on other volumes is worth, in painted slices.

Cases:
- sarcoma, CT and MR apart: train a learner on two of the three dev volumes (fully labelled,
  ``oflsam2.transfer.train_learner``) and apply it prompt-free to the third; all three
  rotations (``../shared/data/dev``, skipped when absent);
- the slicerio chest CT's lungs: train on K = 3 painted slices and apply prompt-free to the
  same CT (a sanity floor: the learner has seen this very volume).

For every target the same structure is also segmented from K = 1 and K = 3 painted slices
of the target itself (``bench/cases.py``'s ``even`` pattern, default settings), so the table
reads "the learner is worth about K painted slices". Dice is over the whole volume.

Usage: ``python bench/transfer.py [--cases sarcoma,chest] [--threads N] [--device cpu]
[--csv PATH] [--feature-cache DIR]``. Runs from a fresh clone when ``../shared`` is present (the chest CT needs
only the ``slicerio`` wheel).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import AXIS, Volume, load_ct, load_dev, paint_slices  # noqa: E402

from oflsam2.metrics import dice  # noqa: E402

DEFAULT_CSV = Path(__file__).resolve().parent / "results" / "transfer.csv"
CHEST_LUNGS = ("right lung", "left lung")


def segmenter_class(store: Path | None):
    """OFLSegmenter, or one keeping encoded slices in ``store`` (``accuracy.cached_segmenter``),
    its cache keyed by the name of the volume set (registered in ``names``)."""
    from accuracy import cached_segmenter

    base = cached_segmenter(store)

    class Named(base):
        names: dict[int, str] = {}  # id(array) -> volume name

        def set_volume(self, array, *args, **kwargs):
            self.volume_name = self.names[id(array)]
            return super().set_volume(array, *args, **kwargs)

    return Named


def _segment_from_painting(settings, volume: Volume, value: int, k: int, make) -> np.ndarray:
    """The structure from K painted slices of the target (the engine's defaults)."""
    truth = volume.labels == value
    slices = paint_slices(truth, "even", k)
    sparse = np.zeros(truth.shape, np.uint8)
    sparse[slices] = truth[slices]
    seg = make(settings)
    seg.set_volume(volume.array, volume.geometry, volume.modality)
    seg.fit(sparse, axis=AXIS)
    return seg.propagate().labels > 0


def _apply(settings, lf, volume: Volume, make) -> tuple[np.ndarray, dict]:
    from oflsam2.transfer import apply_learner, settings_for

    seg = make(settings_for(lf, settings))
    applied = apply_learner(seg, lf, volume.array, volume.geometry, volume.modality)
    return applied.result.labels, {"seeds": applied.seeds, "missing": applied.missing}


def _row(case, target, structure, trained_on, predicted, truth, refs, seconds, extra) -> dict:
    return {
        "case": case,
        "target": target,
        "structure": structure,
        "trained_on": trained_on,
        "dice_learner": round(dice(predicted, truth), 4),
        "dice_k1": round(dice(refs[1], truth), 4),
        "dice_k3": round(dice(refs[3], truth), 4),
        "seed_slice": extra["seeds"],
        "missing": extra["missing"],
        "seconds": round(seconds, 1),
    }


def sarcoma(settings, make) -> list[dict]:
    """Train on two dev sarcoma volumes, apply to the third; CT and MR apart."""
    from oflsam2.transfer import LabelledVolume, train_learner

    rows = []
    volumes = [v for v in load_dev() if "sarcoma" in v.name]
    make.names.update({id(v.array): v.name for v in volumes})
    for modality in ("ct", "mr"):
        group = [v for v in volumes if v.name.startswith(modality)]
        for target in group:
            t0 = time.perf_counter()
            train = [v for v in group if v is not target]
            lf = train_learner(
                [LabelledVolume(v.name, v.array, v.labels, v.geometry, v.modality) for v in train],
                settings,
                {1: "sarcoma"},
                segmenter=make(settings.replace(roi="none")),
            )
            labels, extra = _apply(settings, lf, target, make)
            truth = target.labels == 1
            refs = {k: _segment_from_painting(settings, target, 1, k, make) for k in (1, 3)}
            rows.append(
                _row(
                    modality.upper(),
                    target.name,
                    "sarcoma",
                    "+".join(v.name for v in train),
                    labels == 1,
                    truth,
                    refs,
                    time.perf_counter() - t0,
                    extra,
                )
            )
            print(rows[-1], flush=True)
    return rows


def chest(settings, make) -> list[dict]:
    """The chest CT's lungs: a learner from K = 3 painted slices, applied to the same CT."""
    from oflsam2.transfer import LabelledVolume, train_learner

    ct = load_ct()
    make.names[id(ct.array)] = ct.name
    rows = []
    for value, name in ct.structures.items():
        if name.lower() not in CHEST_LUNGS:
            continue
        t0 = time.perf_counter()
        truth = ct.labels == value
        slices = paint_slices(truth, "even", 3)
        lab = truth.astype(np.uint8)
        lf = train_learner(
            [LabelledVolume("ct_chest", ct.array, lab, ct.geometry, ct.modality, slices)],
            settings,
            {1: name},
            segmenter=make(settings.replace(roi="none")),
        )
        labels, extra = _apply(settings, lf, ct, make)
        refs = {k: _segment_from_painting(settings, ct, value, k, make) for k in (1, 3)}
        row = _row(
            "CT", "ct_chest", name, "ct_chest (K=3)", labels == 1, truth, refs,
            time.perf_counter() - t0, extra,
        )  # fmt: skip
        rows.append(row)
        print(row, flush=True)
    return rows


def _seeds(seeds: dict) -> str:
    return ", ".join(str(t) for t in seeds.values()) if seeds else "not found"


def table(rows: list[dict]) -> str:
    head = "| case | target | structure | learner (prompt-free) | K = 1 | K = 3 | seed slice |"
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['target']} | {r['structure']} | {r['dice_learner']:.3f} | "
            f"{r['dice_k1']:.3f} | {r['dice_k3']:.3f} | {_seeds(r['seed_slice'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="sarcoma,chest", help="sarcoma, chest or both")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", default=str(DEFAULT_CSV))
    p.add_argument("--feature-cache", help="folder keeping encoded slices across runs")
    args = p.parse_args(argv)
    import torch

    from oflsam2.settings import DEFAULTS

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = DEFAULTS.replace(device=args.device, seed=args.seed)
    make = segmenter_class(Path(args.feature_cache) if args.feature_cache else None)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    t0 = time.perf_counter()
    rows = []
    if "sarcoma" in cases:
        found = sarcoma(settings, make)
        if not found:
            print("no sarcoma volumes in ../shared/data/dev: skipped", file=sys.stderr)
        rows += found
    if "chest" in cases:
        rows += chest(settings, make)
    if rows:
        out = Path(args.csv)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(table(rows))
    print(f"{len(rows)} cases in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
