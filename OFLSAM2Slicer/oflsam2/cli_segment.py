"""`oflsam2 segment`: a whole volume from a few painted slices."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .errors import InputError
from .files import write_atomic
from .progress import ProgressEvent
from .settings import BACKBONES, DEFAULTS, DEVICES, IMAGE_SIZES, ROI_MODES, Settings


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs the engine; defaults come from Settings."""
    d = DEFAULTS
    p.add_argument("--backbone", choices=list(BACKBONES), default=d.backbone)
    p.add_argument(
        "--model",
        default=d.model,
        help="SAM2 weights name (see `oflsam2 weights list`)",
    )
    p.add_argument("--checkpoint", help="a checkpoint file instead of the cached weights")
    p.add_argument(
        "--random-init",
        action="store_true",
        help="SAM2 with RANDOM weights: for speed and tests only",
    )
    p.add_argument("--image-size", type=int, choices=list(IMAGE_SIZES), default=d.image_size)
    p.add_argument("--device", default=d.device, choices=list(DEVICES))
    p.add_argument(
        "--no-online",
        action="store_true",
        help="no online updates of the learner while propagating",
    )
    p.add_argument(
        "--gamma",
        type=float,
        default=d.gamma,
        help="confidence a prediction needs to join online training",
    )
    p.add_argument(
        "--fit-steps", type=int, help="training steps on the painted slices (default: by speed)"
    )
    p.add_argument("--roi", choices=list(ROI_MODES), default=d.roi)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--json", metavar="REPORT.json", help="write timings, counts, backbone and device here"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(
        backbone=args.backbone,
        model=args.model,
        checkpoint=args.checkpoint,
        random_init=args.random_init,
        device=args.device,
        image_size=args.image_size,
        online=not args.no_online,
        gamma=args.gamma,
        roi=args.roi,
        seed=args.seed,
        fit_steps=args.fit_steps,
    )


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

    def __call__(self, event: ProgressEvent) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        stage, done, total = event.label(), event.done, event.total
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


def check_memory(n_slices: int, bytes_per_slice: int, image_size: int) -> None:
    """Refuse up front what cannot fit, rather than dying half way."""
    need = n_slices * bytes_per_slice + 1.5e9
    avail = available_memory()
    if avail is not None and need > 0.9 * avail:
        raise InputError(
            f"this volume needs about {need / 2**30:.1f} GiB for {n_slices} slices of features at image size "
            f"{image_size}, but {avail / 2**30:.1f} GiB is free: use --image-size 512, crop the image, "
            "or free memory"
        )


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
    settings = settings_from_args(args)
    slices = parse_slices(args.slices)
    axis = args.axis if args.axis == "auto" else int(args.axis)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    image = vol.read_image(args.image)
    labels = vol.read_labels(args.labels, image.geometry)
    ann = vol.find_annotated(labels.array, axis, slices)
    timings["load"] = time.perf_counter() - t0
    from .segmenter import OFLSegmenter

    seg = OFLSegmenter(settings)
    bb = seg.backbone
    check_memory(image.array.shape[ann.axis], bb.bytes_per_slice(), bb.input_size)
    if bb.random_weights and not args.quiet:
        print(
            "oflsam2: WARNING: SAM2 has RANDOM WEIGHTS; the result is meaningless (speed/tests only)",
            file=sys.stderr,
        )
    result = segment_arrays(seg, image, labels.array, ann, args.quiet)
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


def segment_arrays(seg, image, sparse, ann, quiet: bool):
    bars = ProgressBars(quiet)
    try:
        seg.set_volume(image.array, image.geometry, image.modality)
        seg.fit(sparse, ann.slices if ann.explicit else None, ann.axis, progress=bars)
        result = seg.propagate(progress=bars)
    finally:
        bars.close()
    return result


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
        "online_learning": seg.settings.online,
        "online_updates": result.online_updates,
        "gamma": seg.settings.gamma,
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
    write_atomic(p, json.dumps(report, indent=2))
