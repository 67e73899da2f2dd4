"""`oflsam2 train` and `oflsam2 apply`: a learner trained once, applied to new volumes.

``train`` reads labelled volumes and writes a learner file (:mod:`oflsam2.learner_file`);
``apply`` segments volumes with it and nothing painted, on this machine or on a Dask
cluster (``--scheduler``), skipping volumes whose output exists (resumable batch).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .cli_progress import ProgressBars
from .cli_segment import check_weights_options, model_settings, report_json
from .errors import InputError, check_interrupted
from .files import check_writable, same_file, write_atomic
from .settings import BACKBONES, DEFAULTS, DEVICES, IMAGE_SIZES, Settings

_MAX_SEED = 2**32 - 1


def _add_model_options(p: argparse.ArgumentParser, apply: bool) -> None:
    d = DEFAULTS
    more = " (default: the learner file's)" if apply else ""
    p.add_argument("--backbone", choices=list(BACKBONES), default=None if apply else d.backbone)
    p.add_argument("--model", default=None, help=f"SAM2 weights name{more}")
    p.add_argument("--checkpoint", help="a checkpoint file instead of the cached weights")
    if not apply:
        p.add_argument("--random-init", action="store_true", help="SAM2 with RANDOM weights")
        p.add_argument("--image-size", type=int, choices=list(IMAGE_SIZES), default=d.image_size)
    p.add_argument("--device", default=d.device, choices=list(DEVICES))
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", metavar="REPORT.json", help="write a JSON report here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def register(sub) -> None:
    t = sub.add_parser(
        "train",
        help="train a learner on labelled volumes and save it",
        description="Train one learner per label value on the labelled slices of the volumes; "
        "apply it to new volumes with `oflsam2 apply`.",
    )
    t.add_argument("--image", action="append", required=True, help="a volume (repeat)")
    t.add_argument(
        "--labels",
        action="append",
        required=True,
        help="its label map on the same grid (repeat, one per --image): fully labelled, or "
        "labelled on a few slices",
    )
    t.add_argument("--output", required=True, help="the learner file to write (e.g. liver.oflsam2)")
    t.add_argument("--axis", type=int, choices=[0, 1, 2], default=0, help="slice axis (k, j, i)")
    t.add_argument(
        "--slices-per-volume", type=int, default=12, help="labelled slices used per volume"
    )
    t.add_argument(
        "--negatives", type=int, default=4, help="unlabelled slices beyond the ends per volume"
    )
    t.add_argument("--train-steps", type=int, help="training steps (default: by speed)")
    _add_model_options(t, apply=False)
    t.set_defaults(func=run_train)

    a = sub.add_parser(
        "apply",
        help="segment volumes with a learner file, nothing painted",
        description="Segment each volume with the learner (no painted slice needed); outputs "
        "that exist are skipped unless --overwrite, so an interrupted batch resumes.",
    )
    a.add_argument("--learner", required=True, help="a learner file from `oflsam2 train`")
    a.add_argument("--image", action="append", default=[], help="a volume (repeat)")
    a.add_argument("--input-dir", help="every image file in this folder")
    a.add_argument("--output-dir", required=True, help="label maps go here, one per volume")
    a.add_argument(
        "--suffix", default=".nrrd", choices=[".nrrd", ".seg.nrrd", ".nii.gz", ".nii", ".mha"]
    )
    a.add_argument("--overwrite", action="store_true", help="segment volumes whose output exists")
    a.add_argument("--scheduler", metavar="ADDRESS", help="run on this Dask scheduler")
    a.add_argument(
        "--stride", type=int, default=1, help="look for the structure on every n-th slice"
    )
    a.add_argument("--no-online", action="store_true", help="no online updates while propagating")
    _add_model_options(a, apply=True)
    a.set_defaults(func=run_apply)


# ---------------------------------------------------------------- train


def _check_train(args: argparse.Namespace) -> tuple[Path, Path | None, Settings]:
    if len(args.image) != len(args.labels):
        raise InputError(
            f"give one --labels per --image ({len(args.image)} images, {len(args.labels)} label maps)"
        )
    if args.slices_per_volume < 1 or args.negatives < 0:
        raise InputError("--slices-per-volume must be 1 or more and --negatives 0 or more")
    if args.train_steps is not None and args.train_steps < 1:
        raise InputError(f"--train-steps must be 1 or more, not {args.train_steps}")
    if not 0 <= args.seed <= _MAX_SEED:
        raise InputError(f"--seed must lie in 0..{_MAX_SEED}, not {args.seed}")
    out = Path(args.output)
    report = Path(args.json) if args.json else None
    _check_output_paths(
        [("--output", out), ("--json", report)],
        [("--image", p) for p in args.image] + [("--labels", p) for p in args.labels],
    )
    check_weights_options(args)
    settings = model_settings(args)
    return out, report, settings


def _check_output_paths(outputs, inputs) -> None:
    for option, path in outputs:
        if path is None:
            continue
        if option == "--json" and path.suffix.lower() != ".json":
            raise InputError(f"--json {path}: the report is JSON, give a name ending in .json")
        for name, src in inputs:
            if src and same_file(src, path):
                raise InputError(
                    f"{option} {path} is the {name} file: inputs are never overwritten"
                )
        check_writable(path, option)


def run_train(args: argparse.Namespace) -> int:
    from . import learner_file
    from . import volume as vol
    from .segmenter import OFLSegmenter
    from .transfer import LabelledVolume, train_learner

    out, report, settings = _check_train(args)
    t0 = time.perf_counter()
    volumes, names, colors = [], {}, {}
    for image_path, labels_path in zip(args.image, args.labels, strict=True):
        image = vol.read_image(image_path)
        labels = vol.read_labels(labels_path, image.geometry)
        for v, n in (labels.names or {}).items():
            names.setdefault(int(v), n)
        for v, c in (labels.colors or {}).items():
            colors.setdefault(int(v), c)
        volumes.append(
            LabelledVolume(
                Path(image_path).name, image.array, labels.array, image.geometry, image.modality
            )
        )
        check_interrupted()
    bars = ProgressBars(args.quiet)
    try:
        seg = OFLSegmenter(settings.replace(roi="none"))
        lf = train_learner(
            volumes,
            settings,
            names,
            colors,
            axis=args.axis,
            positives=args.slices_per_volume,
            negatives=args.negatives,
            steps=args.train_steps,
            progress=bars,
            segmenter=seg,
        )
    finally:
        bars.close()
    check_interrupted()
    learner_file.save(lf, out)
    if report is not None:
        meta = dict(lf.meta, output=str(out), seconds=round(time.perf_counter() - t0, 2))
        write_atomic(report, report_json(meta))
    if not args.quiet:
        print(f"wrote {out}: {lf.describe()}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- apply


def _apply_settings(args: argparse.Namespace, lf, path: Path) -> Settings:
    from . import learner_file
    from .transfer import settings_for

    meta = lf.meta
    if args.backbone is not None or args.model is not None:
        backbone = args.backbone or meta.get("backbone")
        model = args.model if backbone == "sam2" else (args.model or "litemedsam")
        learner_file.check_backbone(lf, backbone, model, path)
    if args.stride < 1:
        raise InputError(f"--stride must be 1 or more, not {args.stride}")
    if not 0 <= args.seed <= _MAX_SEED:
        raise InputError(f"--seed must lie in 0..{_MAX_SEED}, not {args.seed}")
    base = DEFAULTS.replace(
        checkpoint=args.checkpoint, device=args.device, seed=args.seed, online=not args.no_online
    )
    settings = settings_for(lf, base)
    args.backbone, args.model, args.random_init = settings.backbone, settings.model, False
    if settings.backbone != "sam2":
        args.model = None
    check_weights_options(args)
    return settings


def _jobs(args: argparse.Namespace):
    from . import batch

    images = list(args.image)
    if args.input_dir:
        images += [str(p) for p in batch.images_in(Path(args.input_dir))]
    if not images:
        raise InputError("give volumes to segment: --image IMG (repeat) or --input-dir DIR")
    for image in images:
        if not Path(image).exists():
            raise InputError(f"--image {image} does not exist")
    out_dir = Path(args.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--output-dir {out_dir} is a file: give a folder")
    if not out_dir.parent.exists():
        raise InputError(f"--output-dir {out_dir}: its folder {out_dir.parent} does not exist")
    out_dir.mkdir(exist_ok=True)
    jobs = batch.plan_jobs(images, out_dir, args.suffix)
    _check_output_paths(
        [("--json", Path(args.json) if args.json else None)],
        [("--learner", args.learner)] + [("--image", j.image) for j in jobs],
    )
    return jobs


def run_apply(args: argparse.Namespace) -> int:
    from . import batch, learner_file

    path = Path(args.learner)
    data = learner_file.read_bytes(path)
    lf = learner_file.from_bytes(data, path)
    settings = _apply_settings(args, lf, path)
    jobs = _jobs(args)
    t0 = time.perf_counter()
    todo = [j for j in jobs if args.overwrite or not Path(j.output).exists()]
    skipped = [
        batch.VolumeRecord(j.image, j.output, "skipped").as_dict() for j in jobs if j not in todo
    ]
    say = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr))
    if skipped:
        say(f"oflsam2: {len(skipped)} of {len(jobs)} outputs exist and are kept (--overwrite)")
    done = [0]

    def on_record(record: dict) -> None:
        done[0] += 1
        state = record["status"] if record["error"] is None else f"failed: {record['error']}"
        seeds = f", seeded on slice(s) {record['seeds']}" if record.get("seeds") else ""
        say(f"oflsam2: [{done[0]}/{len(todo)}] {record['image']}: {state}{seeds}")

    if args.scheduler:
        from .cluster import run_on_cluster

        records = run_on_cluster(
            args.scheduler, data, settings, todo, args.stride, str(path), on_record
        )
    else:
        records = _run_here(data, settings, todo, args, str(path), on_record)
    all_records = skipped + records
    if args.json:
        report = {
            "learner": str(path),
            "learner_summary": lf.describe(),
            "backbone": settings.backbone,
            "model": lf.meta.get("model"),
            "scheduler": args.scheduler,
            "volumes": all_records,
            "written": sum(r["status"] == "written" for r in all_records),
            "skipped": len(skipped),
            "failed": sum(r["status"] == "failed" for r in all_records),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        write_atomic(args.json, report_json(report))
    return _exit_code(records)


def _run_here(data, settings, jobs, args, name, on_record) -> list[dict]:
    """The batch on this machine: one engine, a progress bar per volume, one retry."""
    from . import batch

    records = []
    for job in jobs:
        bars = ProgressBars(args.quiet)
        record = None
        for attempt in (1, 2):
            try:
                record = batch.run_job(data, settings, job, args.stride, name, progress=bars)
                record["attempts"] = attempt
                break
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as exc:  # noqa: BLE001 - reported, retried once
                if attempt == 2:
                    record = batch.failed(job, exc, attempt)
            finally:
                bars.close()
        check_interrupted()
        records.append(record)
        on_record(record)
    return records


def _exit_code(records: list[dict]) -> int:
    """0 all done; 2 some volumes were bad input; 1 some failed otherwise."""
    kinds = {r["kind"] for r in records if r["status"] == "failed"}
    for r in records:
        if r["status"] == "failed":
            print(f"oflsam2: error: {r['image']}: {r['error']}", file=sys.stderr)
    if "internal" in kinds:
        return 1
    return 2 if kinds else 0
