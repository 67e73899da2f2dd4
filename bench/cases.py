"""Benchmark data and painting patterns, shared by the accuracy and guided-painting benchmarks.

Structures: the seven segments of the CT that ships in the ``slicerio`` wheel, plus the seven
labelled volumes of ``../shared/data/dev`` when that folder is there (tests never need it).

Painting patterns: with [lo, hi] the structure's extent along the slice axis (array axis 0)
and n = hi - lo + 1, the K painted slices are

- ``even``: slice i (0 <= i < K) at floor(lo + (i + 0.5) * n / K);
- ``ends``: lo and hi, plus K - 2 slices at round(lo + i * (hi - lo) / (K - 1)), 0 < i < K - 1
  (so strictly between them);
- ``cluster``: K slices 2 apart centred on the middle m = (lo + hi) // 2 of the extent:
  m - (K - 1) + 2 i, so most of the structure lies beyond the painted range.

A chosen slice where the structure is absent (a structure in pieces) moves to the nearest slice
that holds it; slices that collide are kept once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

AXIS = 0
PATTERNS = ("even", "ends", "cluster")
MIN_SLICES = 6  # structures spanning fewer slices are left out
DEV_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "dev"


@dataclass
class Volume:
    """One image with its labelled structures."""

    name: str  # "ct_chest" or the dev case's folder name
    modality: str | None
    array: np.ndarray  # (k, j, i) raw intensities
    geometry: object  # oflsam2.volume.Geometry
    labels: np.ndarray  # uint8 (k, j, i)
    structures: dict[int, str]  # label value -> name


def extent(truth: np.ndarray, axis: int = AXIS) -> tuple[int, int]:
    other = tuple(a for a in range(3) if a != axis)
    holding = np.flatnonzero(np.any(truth, axis=other))
    return int(holding[0]), int(holding[-1])


def paint_slices(truth: np.ndarray, pattern: str, k: int, axis: int = AXIS) -> list[int]:
    """The K slices a user painting with ``pattern`` would paint (module docstring)."""
    lo, hi = extent(truth, axis)
    n = hi - lo + 1
    if pattern == "even":
        wanted = [int(np.floor(lo + (i + 0.5) * n / k)) for i in range(k)]
    elif pattern == "ends":
        wanted = [lo, hi] + [int(round(lo + i * (hi - lo) / (k - 1))) for i in range(1, k - 1)]
    elif pattern == "cluster":
        mid = (lo + hi) // 2
        wanted = [mid - (k - 1) + 2 * i for i in range(k)]
    else:
        raise ValueError(f"unknown painting pattern {pattern!r}: choose from {PATTERNS}")
    other = tuple(a for a in range(3) if a != axis)
    holding = np.flatnonzero(np.any(truth, axis=other))
    chosen = {int(holding[np.argmin(np.abs(holding - min(max(w, lo), hi)))]) for w in wanted}
    return sorted(chosen)


def load_ct() -> Volume:
    """The slicerio chest CT and its seven segments."""
    import slicerio

    from oflsam2.volume import read_image, read_labels

    image = read_image(slicerio.get_testdata_file("CTChest4.nrrd"))
    labels = read_labels(slicerio.get_testdata_file("Segmentation.seg.nrrd"), image.geometry)
    return Volume(
        "ct_chest", image.modality, image.array, image.geometry, labels.array, dict(labels.names)
    )


def load_dev(folder: Path = DEV_DIR) -> list[Volume]:
    """The dev cases (``index.json`` order); an empty list when the folder is absent."""
    from oflsam2.volume import read_image, read_labels

    index = folder / "index.json"
    if not index.is_file():
        return []
    out = []
    for entry in json.loads(index.read_text()):
        case = folder / entry["case"]
        image = read_image(case / "image.nii.gz")
        labels = read_labels(case / "label.nii.gz", image.geometry)
        structure = entry["structure"].split(" (")[0]
        out.append(
            Volume(
                entry["case"],
                "CT" if entry["modality"].upper().startswith("CT") else "MR",
                image.array,
                image.geometry,
                labels.array,
                {1: structure},
            )
        )
    return out


def structures(volume: Volume) -> list[int]:
    """Label values spanning at least MIN_SLICES slices along the axis."""
    out = []
    for value in volume.structures:
        truth = volume.labels == value
        if truth.any():
            lo, hi = extent(truth)
            if hi - lo + 1 >= MIN_SLICES:
                out.append(int(value))
    return out


_ITEMS: list = []  # what a forked worker reads by index (nothing large is pickled)


def _call(task: Callable[[Any, tuple], Any], index: int, job: tuple) -> Any:
    return task(_ITEMS[index], job)


def in_processes(
    task: Callable[[Any, tuple], Any], items: list, job: tuple, workers: int
) -> Iterator[Any]:
    """``task(item, job)`` for every item, in ``workers`` forked processes (1: this one),
    yielded as they finish; ``task`` must be a module-level function."""
    global _ITEMS
    _ITEMS = items
    if workers <= 1:
        for i in range(len(items)):
            yield _call(task, i, job)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(_call, task, i, job) for i in range(len(items))]
        for future in as_completed(futures):
            yield future.result()
