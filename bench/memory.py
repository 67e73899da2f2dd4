"""Peak resident memory of one oflsam2 run: a synthetic N x 512 x 512 volume, 3 painted slices.

Memory, not accuracy or speed: SAM2 random-init (the real model's shapes and activations) and a
short fit (``--fit-steps``, default 4; a step's activations are the same however many steps run).
After the fit every slice is encoded (``OFLSegmenter.encode``), then the learner is refitted (as
after a correction) and the volume propagated, so the cache holds all N slices whatever the
structure's extent; ``--extent`` (its share of the slices) only sets how long the walks are
(they stay between the painted slices: random weights would never end one beyond them).
Peak RSS is the kernel's high-water mark (VmHWM) from the moment the volume exists, so the
volume itself counts, as it does in a real run. The feature cache keeps ``--cache-ram-gib`` of
encoded slices in RAM and the rest in a temporary file; its two byte counts are printed.

    .venv/bin/python bench/memory.py --slices 300 --image-size 1024 --extent 0.05   # 30 min on 2 cores
    .venv/bin/python bench/memory.py --slices 12 --image-size 1024
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def status_gib(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def reset_peak() -> None:
    """Start the high-water mark again from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def volume(slices: int, extent: float) -> tuple[np.ndarray, np.ndarray]:
    """speed.py's synthetic ellipsoid, made slice by slice so that building it peaks at the
    volume's own size (float32)."""
    rng = np.random.default_rng(0)
    y, x = np.ogrid[:512, :512]
    img = np.empty((slices, 512, 512), np.float32)
    truth = np.zeros((slices, 512, 512), np.uint8)
    c = slices / 2
    for z in range(slices):
        blob = ((z - c) / (0.5 * extent * slices)) ** 2 + ((y - 250) / 90.0) ** 2 + (
            (x - 270) / 110.0
        ) ** 2 < 1
        img[z] = rng.normal(40, 30, (512, 512)).astype(np.float32) + 400 * blob
        truth[z] = blob
    return img, truth


def main() -> None:
    from speed import painted

    from oflsam2.segmenter import OFLSegmenter
    from oflsam2.settings import Settings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--cache-ram-gib", type=float, default=Settings().cache_ram_gib)
    ap.add_argument("--extent", type=float, default=0.8, help="the structure's share of the slices")
    ap.add_argument("--fit-steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="append the row to this JSON list")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    img, truth = volume(args.slices, args.extent)
    sparse, slices = painted(truth, 3)
    reset_peak()
    t0 = time.perf_counter()
    settings = Settings(
        backbone="sam2",
        random_init=True,
        device="cpu",
        image_size=args.image_size,
        fit_steps=args.fit_steps,
        cache_ram_gib=args.cache_ram_gib,
        extend=False,  # random weights never end a walk beyond the painted slices
    )
    seg = OFLSegmenter(settings)
    seg.set_volume(img)
    seg.fit(sparse, slices=slices, axis=0)  # sets the axis, crop and window that encode() uses
    seg.encode(list(range(args.slices)))
    seg.fit(sparse, slices=slices, axis=0)  # a correction's warm refit, with the cache full
    peak_fit = status_gib("VmHWM")
    result = seg.propagate()
    row = {
        "slices": args.slices,
        "image_size": args.image_size,
        "extent": args.extent,
        "cache_ram_gib": args.cache_ram_gib,
        "encode_batch": seg.backbone.encode_batch,
        "encoder_calls": seg.encoder_calls,
        "predicted_slices": sum(len(v) for v in result.predicted_slices.values()),
        "cache_in_ram_gib": seg._cache.bytes_in_ram / 2**30,
        "cache_on_disk_gib": seg._cache.bytes_on_disk / 2**30,
        "volume_gib": img.nbytes / 2**30,
        "peak_rss_fit_gib": peak_fit,
        "peak_rss_gib": status_gib("VmHWM"),
        "seconds": time.perf_counter() - t0,
    }
    cols = list(row)
    cells = [f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in cols]
    widths = [max(len(c), len(v)) for c, v in zip(cols, cells, strict=True)]
    print(" | ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    print(" | ".join(v.rjust(w) for v, w in zip(cells, widths, strict=True)))
    if args.json:
        try:
            with open(args.json) as fh:
                rows = json.load(fh)
        except FileNotFoundError:
            rows = []
        with open(args.json, "w") as fh:
            json.dump([*rows, row], fh, indent=1)


if __name__ == "__main__":
    main()
