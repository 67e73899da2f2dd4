"""The accuracy benchmark's painting rules and a minimal run (bench/ is not a package)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

from cases import paint_slices  # noqa: E402


def column(lo: int, hi: int, n: int = 40) -> np.ndarray:
    mask = np.zeros((n, 4, 4), bool)
    mask[lo : hi + 1, 1:3, 1:3] = True
    return mask


@pytest.mark.parametrize(
    "pattern, k, expected",
    [
        ("even", 2, [15, 25]),  # floor(10 + (i + 0.5) * 20 / 2)
        ("even", 3, [13, 20, 26]),
        ("ends", 2, [10, 29]),
        ("ends", 3, [10, 20, 29]),  # round(10 + 19 / 2) = 20
        ("ends", 5, [10, 15, 20, 24, 29]),
        ("cluster", 2, [18, 20]),  # middle 19, 2 apart
        ("cluster", 3, [17, 19, 21]),
        ("cluster", 5, [15, 17, 19, 21, 23]),
    ],
)
def test_painting_patterns(pattern, k, expected):
    assert paint_slices(column(10, 29), pattern, k) == expected


def test_a_slice_without_the_structure_moves_to_the_nearest_that_has_it():
    mask = column(10, 29)
    mask[20] = False  # a structure in two pieces
    assert paint_slices(mask, "ends", 3) == [10, 19, 29]


def test_benchmark_runs_and_writes_its_table(tmp_path):
    out = tmp_path / "acc.csv"
    cmd = [sys.executable, str(BENCH / "accuracy.py"), "--data", "ct", "--structures", "right lung"]
    cmd += ["--patterns", "ends", "--k", "2", "--methods", "nearest_slice", "--csv", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| ends | 2 | 1 |" in done.stdout
    lines = out.read_text().splitlines()
    assert lines[0].startswith("method,seed,structure,pattern,k,slices,dice_unpainted,fp_beyond")
    assert lines[1].startswith("nearest_slice,,ct_chest:right lung,ends,2,7 33,")


@pytest.mark.slow  # builds SAM2 (random weights) and fits a learner
def test_fit_step_split_times_a_copy_and_counts_the_decoder_steps():
    """bench/speed.py: the fit's time per step kind, without training the fitted learner further."""
    import speed
    import torch

    z, y, x = np.ogrid[:8, :48, :48]
    blob = ((z - 4) / 3.5) ** 2 + ((y - 24) / 12.0) ** 2 + ((x - 22) / 10.0) ** 2 < 1
    img = (np.random.default_rng(0).normal(0, 10, blob.shape) + 300 * blob).astype(np.float32)
    sparse, slices = speed.painted(blob.astype(np.uint8), 2)
    seg = speed.make_segmenter(img, "sam2", 256, fit_steps=7, fit_decoder_every=3, patience=99)
    seg.fit(sparse, slices=slices, axis=0)
    learner = next(iter(seg._segments.values())).learner
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    parts = speed.fit_step_seconds(seg, repeats=1)
    assert parts["fit_steps"] == 7 and parts["fit_decoder_steps"] == 3  # steps 0, 3, 6
    assert parts["fit_decoder_step_s"] > 0 and parts["fit_coarse_step_s"] > 0
    assert all(torch.equal(before[k], v) for k, v in learner.state_dict().items())


@pytest.mark.slow  # builds SAM2 (random weights), encodes, fits and propagates
def test_memory_bench_caches_every_slice_and_spills_beyond_the_budget(tmp_path):
    import json

    out = tmp_path / "memory.json"
    cmd = [sys.executable, str(BENCH / "memory.py"), "--slices", "6", "--image-size", "256"]
    cmd += ["--extent", "0.5", "--fit-steps", "1", "--cache-ram-gib", "0.001", "--threads", "1"]
    done = subprocess.run(cmd + ["--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "peak_rss_gib" in done.stdout.splitlines()[0]
    (row,) = json.loads(out.read_text())
    assert row["encoder_calls"] == 6  # every slice, each once
    slice_gib = 512 * 2**10 / 2**30  # SAM2 at 256: 512 KiB of float16 features a slice
    assert row["cache_in_ram_gib"] <= 0.001
    assert 4 * slice_gib <= row["cache_on_disk_gib"] <= 6 * slice_gib
    assert row["peak_rss_gib"] >= row["peak_rss_fit_gib"] > row["volume_gib"] > 0
