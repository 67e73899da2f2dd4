"""`oflsam2 segment`: a whole volume from a few painted slices."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .errors import InputError


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs the engine."""
    p.add_argument("--backbone", choices=["sam2", "litemedsam"], default="sam2")
    p.add_argument(
        "--model",
        default="sam2.1_hiera_tiny",
        help="SAM2 weights name (see `oflsam2 weights list`)",
    )
    p.add_argument("--checkpoint", help="a SAM2 checkpoint file instead of the cached weights")
    p.add_argument(
        "--random-init",
        action="store_true",
        help="SAM2 with RANDOM weights: for speed and tests only",
    )
    p.add_argument("--image-size", type=int, choices=[512, 1024], default=1024)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument(
        "--no-online",
        action="store_true",
        help="no online updates of the learner while propagating",
    )
    p.add_argument(
        "--gamma",
        type=float,
        default=0.9,
        help="confidence a prediction needs to join online training",
    )
    p.add_argument(
        "--fit-steps", type=int, help="training steps on the painted slices (default: by speed)"
    )
    p.add_argument("--roi", choices=["auto", "none"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--json", metavar="REPORT.json", help="write timings, counts, backbone and device here"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def register(sub) -> None:
    p = sub.add_parser(
        "segment",
        help="segment a volume from a few painted slices",
        description="Propagate the painted slices of SPARSE through IMG; OUT gets IMG's exact geometry.",
    )
    p.add_argument(
        "--image", required=True, help="the volume (.nrrd, .nii.gz, .mha, DICOM folder, ...)"
    )
    p.add_argument(
        "--labels", required=True, help="label map on IMG's grid: 0 background, k > 0 segment k"
    )
    p.add_argument(
        "--output",
        required=True,
        help="where to write the label map (.nrrd, .nii.gz, .seg.nrrd, ...)",
    )
    p.add_argument(
        "--axis",
        default="auto",
        choices=["auto", "0", "1", "2"],
        help="slice axis in array (k, j, i) order",
    )
    p.add_argument(
        "--slices", help="annotated slices, e.g. 12,40,77 (then an empty one means 'absent here')"
    )
    add_engine_options(p)
    p.set_defaults(func=run_segment)


def parse_slices(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(s) for s in text.replace(" ", "").split(",") if s != ""]
    except ValueError:
        raise InputError(
            f"--slices must be comma-separated integers such as 12,40,77, not {text!r}"
        ) from None


class ProgressBars:
    """One tqdm bar per stage, on stderr."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.stage = None
        self.bar = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=stage, unit="step", file=sys.stderr, leave=False)
        if self.bar.total != total:
            self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(n_slices: int, image_size: int, backbone: str) -> None:
    """Refuse up front what cannot fit, rather than dying half way."""
    if backbone == "litemedsam":
        per_slice = 256 * 64 * 64 * 2
    else:
        h = image_size // 16
        per_slice = (256 * h * h + 32 * (4 * h) ** 2 + 64 * (2 * h) ** 2) * 2
    need = n_slices * per_slice + 1.5e9
    avail = available_memory()
    if avail is not None and need > 0.9 * avail:
        raise InputError(
            f"this volume needs about {need / 2**30:.1f} GiB for {n_slices} slices of features at image size "
            f"{image_size}, but {avail / 2**30:.1f} GiB is free: use --image-size 512, crop the image, "
            "or free memory"
        )


def engine_kwargs(args: argparse.Namespace) -> dict:
    return {
        "backbone": args.backbone,
        "model": args.model,
        "checkpoint": args.checkpoint,
        "random_init": args.random_init,
        "device": args.device,
        "image_size": args.image_size,
        "online": not args.no_online,
        "gamma": args.gamma,
        "roi": args.roi,
        "seed": args.seed,
        "fit_steps": args.fit_steps,
    }


def run_segment(args: argparse.Namespace) -> int:
    from . import volume as vol

    out = Path(args.output)
    for src in (args.image, args.labels):
        if os.path.exists(src) and out.exists() and os.path.samefile(src, out):
            raise InputError(
                f"--output {out} is one of the inputs: choose another file, inputs are never overwritten"
            )
    if not out.parent.exists():
        raise InputError(f"output folder {out.parent} does not exist: create it first")
    if args.backbone == "litemedsam" and args.random_init:
        raise InputError(
            "--random-init applies to SAM2 only; LiteMedSAM always uses its bundled weights"
        )
    slices = parse_slices(args.slices)
    axis = args.axis if args.axis == "auto" else int(args.axis)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    image = vol.read_image(args.image)
    labels = vol.read_labels(args.labels, image.geometry)
    ann = vol.find_annotated(labels.array, axis, slices)
    timings["load"] = time.perf_counter() - t0
    check_memory(image.array.shape[ann.axis], args.image_size, args.backbone)
    if args.random_init and not args.quiet:
        print(
            "oflsam2: WARNING: SAM2 has RANDOM WEIGHTS; the result is meaningless (speed/tests only)",
            file=sys.stderr,
        )
    result, seg = segment_arrays(image, labels.array, ann, args)
    timings.update(result.timings)
    t1 = time.perf_counter()
    vol.write_labels(out, result.labels, image.geometry, labels.names, labels.colors)
    timings["write"] = time.perf_counter() - t1
    timings["total"] = time.perf_counter() - t0
    report = make_report(args, image, result, seg, timings)
    if args.json:
        write_json(args.json, report)
    if not args.quiet:
        counts = ", ".join(f"{v}: {n}" for v, n in sorted(result.voxels.items()))
        print(
            f"wrote {out}: axis {result.axis}, annotated {result.annotated}, voxels per segment {{{counts}}}, "
            f"{timings['total']:.1f} s ({seg.backbone.weights}, {seg.backbone.device})",
            file=sys.stderr,
        )
    return 0


def segment_arrays(image, sparse, ann, args):
    from .segmenter import OFLSegmenter

    bars = ProgressBars(args.quiet)
    try:
        seg = OFLSegmenter(**engine_kwargs(args))
        seg.set_volume(image.array, image.geometry, image.modality)
        seg.fit(sparse, ann.slices if ann.explicit else None, ann.axis, progress=bars)
        result = seg.propagate(progress=bars)
    finally:
        bars.close()
    return result, seg


def make_report(args, image, result, seg, timings: dict) -> dict:
    import platform

    import torch

    bb = seg.backbone
    return {
        "oflsam2": __import__("oflsam2").__version__,
        "image": str(args.image),
        "output": str(args.output),
        "shape_kji": list(image.array.shape),
        "axis": result.axis,
        "annotated_slices": result.annotated,
        "slices_in_volume": int(image.array.shape[result.axis]),
        "slices_encoded": seg.encoder_calls,
        "slices_predicted": {str(v): len(s) for v, s in result.predicted_slices.items()},
        "voxels_per_segment": {str(v): n for v, n in result.voxels.items()},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "backbone": bb.name,
        "weights": bb.weights,
        "random_weights": bool(bb.random_weights),
        "warning": "RANDOM WEIGHTS: result is meaningless, for speed and tests only"
        if bb.random_weights
        else None,
        "image_size": bb.input_size,
        "device": str(bb.device),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "online_learning": seg.online,
        "online_updates": result.online_updates,
        "gamma": seg.gamma,
        "roi": None
        if seg.roi is None
        else {"r0": seg.roi.r0, "c0": seg.roi.c0, "side": seg.roi.side},
        "window": list(seg.window) if seg.window else None,
        "fit_final_loss": {
            str(v): (round(ls[-1], 4) if ls else None) for v, ls in result.losses.items()
        },
    }


def write_json(path: str, report: dict) -> None:
    p = Path(path)
    if not p.parent.exists():
        raise InputError(f"folder of --json {p} does not exist: create it first")
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(p)
