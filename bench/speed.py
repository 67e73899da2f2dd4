"""Speed and memory of oflsam2 against plain SAM2 propagation (random-init SAM2 tiny).

Prints a table; numbers are measured in one run of this script, so ratios between rows
are comparable even on a noisy machine. Random weights: FLOPs equal the real model's,
masks are meaningless.

    .venv/bin/python bench/speed.py                       # slicerio CT + synthetic 512x512x200, sizes 512 and 1024
    .venv/bin/python bench/speed.py --cases ct --sizes 512
    .venv/bin/python bench/speed.py --synthetic-slices 40 # a shorter synthetic volume
"""

from __future__ import annotations

import argparse
import resource
import time
from collections import OrderedDict

import numpy as np
import torch


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def ct_case():
    import slicerio

    from oflsam2 import volume as vol

    image = vol.read_image(slicerio.get_testdata_file("CTChest4.nrrd"))
    labels = vol.read_labels(slicerio.get_testdata_file("Segmentation.seg.nrrd"), image.geometry)
    truth = (labels.array == 5).astype(np.uint8) * 5
    return "slicerio CT 34x128x128 (right lung)", image.array, truth


def synthetic_case(slices: int):
    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[:slices, :512, :512]
    c = slices / 2
    blob = ((z - c) / (0.4 * slices)) ** 2 + ((y - 250) / 90.0) ** 2 + ((x - 270) / 110.0) ** 2 < 1
    img = (rng.normal(40, 30, (slices, 512, 512)) + 400 * blob).astype(np.float32)
    return f"synthetic {slices}x512x512", img, blob.astype(np.uint8)


def painted(truth: np.ndarray, k: int) -> tuple[np.ndarray, list[int]]:
    from oflsam2.baselines import choose_slices

    slices = choose_slices(truth > 0, 0, k)
    sparse = np.zeros_like(truth)
    for s in slices:
        sparse[s] = truth[s]
    return sparse, slices


def plain_sam2(seg, slices: list[int], sparse: np.ndarray) -> tuple[float, int]:
    """SAM2's own video predictor API on the same tensors (our ROI crop and window)."""
    bb = seg.backbone
    net = bb.net
    n = sparse.shape[0]
    imgs = np.stack(
        [seg.roi.crop(seg._window_slice(t)) for t in range(n)]  # same preprocessing as oflsam2
    )
    images = bb.prepare(imgs)
    calls = {"n": 0}
    original = net.forward_image

    def counting(batch):
        calls["n"] += batch.shape[0]
        return original(batch)

    net.forward_image = counting
    try:
        state = _state_from_tensor(net, images, seg.roi.side)
        t0 = time.perf_counter()
        for s in slices:
            mask = torch.from_numpy(seg.roi.crop((sparse[s] > 0).astype(np.uint8)).astype(bool))
            net.add_new_mask(state, frame_idx=s, obj_id=1, mask=mask)
        with torch.no_grad():
            for _ in net.propagate_in_video(state, start_frame_idx=min(slices)):
                pass
            for _ in net.propagate_in_video(state, start_frame_idx=max(slices), reverse=True):
                pass
        return time.perf_counter() - t0, calls["n"]
    finally:
        net.forward_image = original


def _state_from_tensor(net, images: torch.Tensor, side: int) -> dict:
    """SAM2's inference state as init_state builds it, with frames from a tensor instead of JPEGs."""
    dev = net.device
    state = {
        "images": images.to(dev),
        "num_frames": images.shape[0],
        "offload_video_to_cpu": False,
        "offload_state_to_cpu": False,
        "video_height": side,
        "video_width": side,
        "device": dev,
        "storage_device": dev,
        "point_inputs_per_obj": {},
        "mask_inputs_per_obj": {},
        "cached_features": {},
        "constants": {},
        "obj_id_to_idx": OrderedDict(),
        "obj_idx_to_id": OrderedDict(),
        "obj_ids": [],
        "output_dict_per_obj": {},
        "temp_output_dict_per_obj": {},
        "frames_tracked_per_obj": {},
    }
    return state


def run_ofl(img, sparse, size: int, online: bool):
    from oflsam2.segmenter import OFLSegmenter
    from oflsam2.settings import Settings

    seg = OFLSegmenter(
        Settings(backbone="sam2", random_init=True, device="cpu", image_size=size, online=online)
    )
    seg.set_volume(img)
    t0 = time.perf_counter()
    seg.fit(sparse)
    r = seg.propagate()
    total = time.perf_counter() - t0
    return seg, r, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="ct,synthetic")
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--synthetic-slices", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = []
    if "ct" in args.cases:
        cases.append(ct_case())
    if "synthetic" in args.cases:
        cases.append(synthetic_case(args.synthetic_slices))
    rows = []
    for name, img, truth in cases:
        sparse, slices = painted(truth, 3)
        for size in [int(s) for s in args.sizes.split(",")]:
            seg, r_on, total_on = run_ofl(img, sparse, size, online=True)
            plain_t, plain_calls = plain_sam2(seg, slices, sparse)
            seg_off, r_off, total_off = run_ofl(img, sparse, size, online=False)
            prop_on = r_on.timings["propagate"] + r_on.timings["encode"]
            prop_off = r_off.timings["propagate"] + r_off.timings["encode"]
            # Re-propagation after adding one slice (inside the ROI), on the warm segmenter.
            extra = sorted(set(range(min(slices), max(slices) + 1)) - set(slices))[len(slices) // 2]
            sparse2 = sparse.copy()
            sparse2[extra] = truth[extra]
            t0 = time.perf_counter()
            seg.fit(sparse2)
            seg.propagate()
            re_t = time.perf_counter() - t0
            rows.append(
                {
                    "case": name,
                    "size": size,
                    "plain_sam2_s": plain_t,
                    "ofl_fit_s": r_on.timings["fit"],
                    "ofl_prop_s": prop_on,
                    "ofl_noonline_prop_s": prop_off,
                    "ratio_prop": prop_on / plain_t,
                    "ratio_prop_noonline": prop_off / plain_t,
                    "ratio_total": total_on / plain_t,
                    "reprop_frac": re_t / total_on,
                    "encoder_calls": seg.encoder_calls,
                    "plain_encoder_calls": plain_calls,
                    "slices": img.shape[0],
                    "online_updates": r_on.online_updates,
                    "peak_rss_gib": peak_rss_gib(),
                }
            )
            print_table(rows)


def print_table(rows) -> None:
    cols = [
        ("case", "{}"),
        ("size", "{}"),
        ("plain_sam2_s", "{:.1f}"),
        ("ofl_fit_s", "{:.1f}"),
        ("ofl_prop_s", "{:.1f}"),
        ("ofl_noonline_prop_s", "{:.1f}"),
        ("ratio_prop", "{:.2f}"),
        ("ratio_prop_noonline", "{:.2f}"),
        ("ratio_total", "{:.2f}"),
        ("reprop_frac", "{:.2f}"),
        ("encoder_calls", "{}"),
        ("plain_encoder_calls", "{}"),
        ("slices", "{}"),
        ("online_updates", "{}"),
        ("peak_rss_gib", "{:.2f}"),
    ]
    table = [[c for c, _ in cols]] + [[f.format(r[c]) for c, f in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    print()
    for row in table:
        print(" | ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
