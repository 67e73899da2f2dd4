"""The feature cache: a RAM budget, the rest in a temporary file, bit for bit the same."""

from __future__ import annotations

import sys
import tempfile

import numpy as np
import pytest
import torch

from oflsam2.cache import FeatureCache, trim_heap

SHAPES = [(8, 4, 4), (2, 16, 16), (4, 8, 8)]  # an embedding and two high-resolution maps


def features(seed: int):
    g = torch.Generator().manual_seed(seed)
    arrays = [torch.randn(s, generator=g).half() for s in SHAPES]
    return arrays[0], arrays[1:]


SLICE_BYTES = sum(2 * torch.Size(s).numel() for s in SHAPES)


def same(a, b) -> bool:
    return torch.equal(a[0], b[0]) and all(
        torch.equal(x, y) for x, y in zip(a[1], b[1], strict=True)
    )


def test_beyond_the_budget_slices_go_to_disk_and_come_back_identical():
    cache = FeatureCache(ram_bytes=2 * SLICE_BYTES)
    for t in range(5):
        cache[t] = features(t)
    assert cache.bytes_in_ram == 2 * SLICE_BYTES  # the two most recent
    assert cache.bytes_on_disk == 3 * SLICE_BYTES
    assert len(cache) == 5 and sorted(cache) == [0, 1, 2, 3, 4] and 4 in cache and 5 not in cache
    for t in (0, 3, 1, 4, 2, 0):  # from disk and from RAM, in any order
        got = cache[t]
        assert got[0].dtype == torch.float16 and same(got, features(t))
        assert cache.bytes_in_ram <= 2 * SLICE_BYTES
    assert cache.bytes_on_disk == 5 * SLICE_BYTES  # each slice written once, however often read
    with pytest.raises(KeyError):
        cache[7]
    cache.clear()
    assert len(cache) == 0 and cache.bytes_on_disk == 0 and cache.bytes_in_ram == 0
    cache[1] = features(1)  # usable again after clear
    assert same(cache[1], features(1))


def test_float32_features_are_stored_as_float16():
    cache = FeatureCache(ram_bytes=0)  # everything but the newest on disk
    embed, hires = features(0)
    cache[0] = (embed.float(), [h.float() for h in hires])
    cache[1] = features(1)
    assert cache.bytes_on_disk == SLICE_BYTES
    assert same(cache[0], features(0))


def test_no_budget_never_touches_the_disk(monkeypatch):
    monkeypatch.setattr(tempfile, "TemporaryFile", None)  # any use would raise
    cache = FeatureCache(ram_bytes=None)
    for t in range(10):
        cache[t] = features(t)
    assert cache.bytes_in_ram == 10 * SLICE_BYTES and cache.bytes_on_disk == 0


def test_a_disk_that_cannot_be_written_keeps_the_slices_in_ram(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    cache = FeatureCache(ram_bytes=SLICE_BYTES)
    for t in range(3):
        cache[t] = features(t)
    assert cache.spill_failed and cache.bytes_on_disk == 0
    assert cache.bytes_in_ram == 3 * SLICE_BYTES
    assert all(same(cache[t], features(t)) for t in range(3))


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap: Linux only")
def test_trim_heap_gives_freed_memory_back_to_the_os():
    chunks = [np.ones(8192) for _ in range(3000)]  # 64 KiB each: from the heap, not mmap
    pin = np.ones(8192)  # allocated above them, so their space is not at the heap's top
    del chunks
    freed = rss_mib()  # glibc keeps the 190 MiB resident
    trim_heap()
    assert freed - rss_mib() > 100
    del pin
