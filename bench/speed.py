"""Speed and memory of oflsam2: a first run, plain SAM2 propagation, and a correction.

Per case and backbone (random-init SAM2 tiny at each size: FLOPs equal the real model's, masks
are meaningless; LiteMedSAM with its real weights): fit seconds and the whole first run (3
painted slices, encoding included), plain SAM2's own video predictor on the same tensors, then
one more slice painted in the middle of the largest gap: the local re-run (only that gap is
decoded again) against a full run with the same learner (Dice of the two on the gap).
Numbers in one table come from one run of this script, so ratios are comparable even on a
noisy machine. ``--encoders`` also times the frozen encoder in fp32, bf16 autocast (when the
CPU has AVX512-BF16 or AMX) and channels-last.

    .venv/bin/python bench/speed.py                       # CT + synthetic 200x512x512, SAM2 at 512 and 1024, LiteMedSAM
    .venv/bin/python bench/speed.py --cases ct --backbones litemedsam --encoders
    .venv/bin/python bench/speed.py --device cuda --json bench/results/speed-gpu.json
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


def make_segmenter(img, backbone: str, size: int, **changes):
    from oflsam2.segmenter import OFLSegmenter
    from oflsam2.settings import Settings

    settings = Settings(
        backbone=backbone, random_init=backbone == "sam2", device=DEVICE, image_size=size, **changes
    )
    seg = OFLSegmenter(settings)
    seg.set_volume(img)
    return seg


def timed_run(seg, sparse, slices) -> tuple[float, float, object]:
    """(fit seconds, whole-run seconds, result) of fit + propagate, encoding included."""
    t0 = time.perf_counter()
    seg.fit(sparse, slices=slices, axis=0)
    fit_s = time.perf_counter() - t0
    result = seg.propagate()
    return fit_s, time.perf_counter() - t0, result


def correction(
    truth: np.ndarray, sparse: np.ndarray, slices: list[int]
) -> tuple[np.ndarray, list[int], list[int]]:
    """One more painted slice in the middle of the largest painted gap, and that gap's slices."""
    gaps = [(b - a, a, b) for a, b in zip(slices, slices[1:], strict=False)]
    _, a, b = max(gaps)
    extra = (a + b) // 2
    sparse2 = sparse.copy()
    sparse2[extra] = truth[extra]
    return sparse2, sorted([*slices, extra]), list(range(a + 1, b))


def fit_step_seconds(seg, repeats: int = 3) -> dict:
    """Seconds of one fit step through the decoder and of one coarse-head step, on a copy of the
    learner (the segmenter's own stays as fitted): where a fit's time goes."""
    import copy

    from oflsam2.training import train_steps

    segment = next(iter(seg._segments.values()))
    learner = copy.deepcopy(segment.learner)
    opt = torch.optim.Adam(learner.parameters(), lr=seg.settings.learning_rate)
    gen = torch.Generator().manual_seed(0)

    def timed(steps: int, every: int) -> float:
        t0 = time.perf_counter()
        train_steps(
            learner,
            seg.backbone,
            opt,
            segment.anchors,
            steps,
            gen,
            seg.settings,
            patience=None,
            decoder_every=every,
        )
        return time.perf_counter() - t0

    decoder = timed(repeats, 1) / repeats
    coarse = (timed(repeats + 1, repeats + 2) - decoder) / repeats  # step 0 is a decoder step
    steps = len(segment.losses)
    return {
        "fit_steps": steps,
        "fit_decoder_steps": len(range(0, steps, seg.fit_decoder_every)),
        "fit_decoder_step_s": decoder,
        "fit_coarse_step_s": coarse,
    }


def measure(name, img, truth, backbone: str, size: int, plain: bool) -> dict:
    from oflsam2.metrics import dice

    sparse, slices = painted(truth, 3)
    seg = make_segmenter(img, backbone, size)
    fit_s, first_s, first = timed_run(seg, sparse, slices)
    parts = fit_step_seconds(seg)
    plain_t, plain_calls = plain_sam2(seg, slices, sparse) if plain else (float("nan"), 0)
    # A correction: one more slice; local re-run against a full run with the same learner.
    sparse2, slices2, gap = correction(truth, sparse, slices)
    refit_s, local_s, local = timed_run(seg, sparse2, slices2)
    seg.retune(seg.settings.replace(local=False))
    t0 = time.perf_counter()
    full = seg.propagate()
    full_s = refit_s + time.perf_counter() - t0
    return {
        "case": name,
        "backbone": backbone,
        "image_size": size if backbone == "sam2" else 256,
        "slices": img.shape[0],
        "fit_s": fit_s,
        **parts,
        "first_run_s": first_s,
        "plain_sam2_s": plain_t,
        "ratio_total": first_s / plain_t if plain else float("nan"),
        "reprop_local_s": local_s,
        "reprop_full_s": full_s,
        "reprop_frac": local_s / first_s,
        "local_dice_gap": dice(local.labels[gap] > 0, full.labels[gap] > 0),
        "encoder_calls": seg.encoder_calls,
        "plain_encoder_calls": plain_calls,
        "encoder_option": "fp32",
        "peak_rss_gib": peak_rss_gib(),
    }


def encoder_options(backbone: str, size: int, batch: int = 4) -> list[dict]:
    """Seconds per slice of the frozen image encoder: fp32, bf16 autocast, channels-last."""
    seg = make_segmenter(np.zeros((1, 8, 8), np.float32), backbone, size)
    bb = seg.backbone
    x = bb.prepare(np.random.default_rng(0).random((batch, 256, 256)).astype(np.float32))
    bf16 = _cpu_has_bf16()
    out = []
    for option in ("fp32", "bf16-autocast", "channels-last"):
        if option == "bf16-autocast" and not bf16:
            continue
        xi = x.contiguous(memory_format=torch.channels_last) if option == "channels-last" else x
        ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=option == "bf16-autocast")
        with ctx:
            bb.encode(xi[:1])  # warm-up
            t0 = time.perf_counter()
            enc = bb.encode(xi)
            sec = (time.perf_counter() - t0) / batch
        out.append({"backbone": backbone, "option": option, "s_per_slice": sec, "embed": enc.embed})
    ref = out[0]["embed"].float()
    for row in out:
        e = row.pop("embed").float()
        row["max_rel_diff"] = float((e - ref).abs().max() / ref.abs().max())
    return out


def _cpu_has_bf16() -> bool:
    try:
        from pathlib import Path

        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


DEVICE = "cpu"


def main() -> None:
    import json

    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="ct,synthetic")
    ap.add_argument("--backbones", default="sam2,litemedsam")
    ap.add_argument("--sizes", default="512,1024", help="SAM2 input sizes (LiteMedSAM: 256)")
    ap.add_argument("--synthetic-slices", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--encoders", action="store_true", help="also time the encoder options")
    ap.add_argument("--json", help="write every row here as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    DEVICE = args.device
    cases = []
    if "ct" in args.cases:
        cases.append(ct_case())
    if "synthetic" in args.cases:
        cases.append(synthetic_case(args.synthetic_slices))
    rows, encoders = [], []
    for backbone in args.backbones.split(","):
        sizes = [int(s) for s in args.sizes.split(",")] if backbone == "sam2" else [256]
        for size in sizes:
            if args.encoders:
                encoders += encoder_options(backbone, size)
                print_table(encoders, ENCODER_COLUMNS)
            for name, img, truth in cases:
                rows.append(measure(name, img, truth, backbone, size, plain=backbone == "sam2"))
                print_table(rows, COLUMNS)
                if args.json:
                    with open(args.json, "w") as fh:
                        json.dump({"runs": rows, "encoders": encoders}, fh, indent=1)


COLUMNS = [
    ("case", "{}"),
    ("backbone", "{}"),
    ("image_size", "{}"),
    ("fit_s", "{:.1f}"),
    ("fit_steps", "{}"),
    ("fit_decoder_steps", "{}"),
    ("fit_decoder_step_s", "{:.2f}"),
    ("fit_coarse_step_s", "{:.2f}"),
    ("first_run_s", "{:.1f}"),
    ("plain_sam2_s", "{:.1f}"),
    ("ratio_total", "{:.2f}"),
    ("reprop_local_s", "{:.1f}"),
    ("reprop_full_s", "{:.1f}"),
    ("reprop_frac", "{:.2f}"),
    ("local_dice_gap", "{:.3f}"),
    ("encoder_calls", "{}"),
    ("plain_encoder_calls", "{}"),
    ("encoder_option", "{}"),
    ("peak_rss_gib", "{:.2f}"),
]
ENCODER_COLUMNS = [
    ("backbone", "{}"),
    ("option", "{}"),
    ("s_per_slice", "{:.3f}"),
    ("max_rel_diff", "{:.4f}"),
]


def print_table(rows, cols) -> None:
    table = [[c for c, _ in cols]] + [[f.format(r[c]) for c, f in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    print()
    for row in table:
        print(" | ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
