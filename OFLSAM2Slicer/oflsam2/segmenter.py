"""The public API: one OFLSegmenter per volume (fit / propagate / save / load).

The segmenter owns the feature cache: every slice that is needed is encoded once,
stored as float16 and read by fitting, propagation, re-propagation and online updates.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import volume as vol
from .backbones import Backbone, build_backbone
from .backbones.base import NOT_DECODED_LOGIT, Prediction, Tracker
from .cache import FeatureCache, trim_heap
from .errors import Cancelled, InputError
from .learner import Learner
from .progress import ENCODE, FIT, PROPAGATE, Progress, ProgressEvent
from .roi import Roi, compute_roi, mask_box
from .settings import DEFAULTS, Settings
from .training import Sample, train_steps

LEARNER_FORMAT = "oflsam2-learner-2"  # see learner_file.FORMAT


@dataclass
class Result:
    labels: np.ndarray  # uint8 (k, j, i); annotated slices exactly as given
    confidence: (
        np.ndarray
    )  # (slices along axis,) mean confidence of predicted slices, nan elsewhere
    axis: int
    annotated: list[int]
    timings: dict[str, float] = field(default_factory=dict)
    encoded_slices: int = 0  # slices encoded by this call (cache misses)
    predicted_slices: dict[int, list[int]] = field(default_factory=dict)  # segment -> slices
    voxels: dict[int, int] = field(default_factory=dict)  # segment -> voxel count
    losses: dict[int, list[float]] = field(default_factory=dict)  # segment -> fit losses
    online_updates: int = 0
    # (slices along axis,) 1 - Dice of the forward and backward walks where both reached the
    # slice (the worst segment), nan elsewhere: where the two painted neighbours disagree
    disagreement: np.ndarray | None = None
    # segment -> slices decoded by this call (all predicted slices unless re-run locally)
    recomputed: dict[int, list[int]] = field(default_factory=dict)


@dataclass
class _Segment:
    value: int
    learner: Learner
    optimizer: torch.optim.Optimizer
    tracker: Tracker | None = None  # made at fit, from the painted slices
    buffer: list[Sample] = field(default_factory=list)
    anchors: list[Sample] = field(default_factory=list)  # painted slices, in every online batch
    losses: list[float] = field(default_factory=list)
    last: _SegmentRun | None = None  # the last finished propagation, kept for local re-runs
    last_painted: dict[int, np.ndarray] = field(default_factory=dict)  # its annotated slices


@dataclass
class _SegmentRun:
    """One segment's propagation: full-slice logits and per-slice confidence and disagreement."""

    logits: dict[int, np.ndarray] = field(default_factory=dict)
    confidence: dict[int, float] = field(default_factory=dict)
    disagreement: dict[int, float] = field(default_factory=dict)
    updates: int = 0


@dataclass
class _Walk:
    """Counters shared by the two walks of one segment."""

    total: int
    done: int = 0
    since_update: int = 0
    updates: int = 0


class _View:
    """One segment of the segmenter's volume, as its tracker sees it (:class:`SegmentView`)."""

    def __init__(self, owner: OFLSegmenter, value: int) -> None:
        self._owner = owner
        self.value = value
        self.annotated = owner._annotated_for(value)
        self.n_slices = owner._n_slices()

    def features(self, t: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self._owner._get(t)

    def painted(self, t: int) -> np.ndarray:
        return self._owner._slice(self._owner._sparse, t) == self.value

    def target(self, mask2d: np.ndarray, size: int) -> torch.Tensor:
        return self._owner._target(mask2d, size)

    def box(self, mask2d: np.ndarray) -> torch.Tensor | None:
        return self._owner._box(mask2d)

    def interpolated(self, t: int) -> np.ndarray:
        """Shape between the two nearest annotated slices by signed-distance interpolation."""
        return self.distance(t) < 0

    def distance(self, t: int) -> np.ndarray:
        """Signed distance (pixels, negative inside) interpolated from the two nearest annotated
        slices: what Slicer's "Fill between slices" would put on slice ``t``."""
        a = max(x for x in self.annotated if x < t)
        b = min(x for x in self.annotated if x > t)
        w = (t - a) / float(b - a)
        return (1 - w) * _sdf(self.painted(a)) + w * _sdf(self.painted(b))

    def prior(self, t: int, size: int) -> torch.Tensor:
        """The interpolated shape as (1, 1, size, size) mask-prompt logits over the crop: +-10
        beyond ``prior_scale`` pixels from its boundary, linear across it."""
        owner = self._owner
        logits = np.clip(-self.distance(t) / owner.settings.prior_scale, -1.0, 1.0) * 10.0
        crop = torch.from_numpy(owner.roi.crop(logits.astype(np.float32)))[None, None]
        return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)


def _sdf(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    if not mask.any():
        return np.full(mask.shape, 1e3)
    return ndimage.distance_transform_edt(~mask) - ndimage.distance_transform_edt(mask)


class OFLSegmenter:
    """OFL-SAM2 on one volume.

    ``set_volume`` (lazy: nothing is encoded yet), ``fit`` (trains one learner per
    segment on the annotated slices), ``propagate`` (walks out from the annotated
    slices with the backbone's tracker, fusing learned target features, updating the
    learner online). Calling ``fit`` + ``propagate`` again after a correction reuses the
    feature cache and warm-starts the learners.
    """

    def __init__(self, settings: Settings = DEFAULTS) -> None:
        self.settings = settings
        with _private_rng(settings.seed):  # random-init SAM2 draws its weights here
            self.backbone: Backbone = build_backbone(settings)
        self.encoder_calls = 0
        self._array: np.ndarray | None = None
        self.geometry: vol.Geometry | None = None
        self.modality: str | None = None
        self._cache = FeatureCache(settings.cache_ram_bytes)
        self._cache_key: tuple | None = None
        self._segments: dict[int, _Segment] = {}
        self._sparse: np.ndarray | None = None
        self.annotation: vol.Annotation | None = None
        self.window: tuple[float, float] | None = None
        self.roi: Roi | None = None
        self.fit_seconds = 0.0
        self.encode_seconds = 0.0  # all encoding so far; fit and propagate timings exclude it
        self._fit_encode_seconds = 0.0
        self._seed(settings.seed)

    def _seed(self, seed: int) -> None:
        """The engine's own random streams; the host's global RNG (Slicer's Python) is untouched."""
        self._gen = torch.Generator().manual_seed(seed)  # augmentation, online batches
        with _private_rng(seed):
            self._init_rng = torch.get_rng_state()  # learner initialisation

    # ---------------------------------------------------------------- volume
    def set_volume(
        self, array: np.ndarray, geometry: vol.Geometry | None = None, modality: str | None = None
    ) -> None:
        """Use ``array`` (k, j, i). The same array object again keeps the feature cache."""
        array = np.asarray(array)
        if array.ndim != 3:
            raise InputError(f"the volume must be 3D, got an array of shape {array.shape}")
        if min(array.shape) < 1:
            raise InputError(f"the volume is empty (shape {array.shape})")
        if geometry is not None and tuple(geometry.shape) != tuple(array.shape):
            raise InputError(f"geometry {geometry.shape} does not match the array {array.shape}")
        if array is not self._array:
            self._cache.clear()
            self._cache_key = None
            self._segments.clear()
            self.window = None
            self.roi = None
        self._array = array
        self.geometry = geometry
        self.modality = modality

    def reset(self, settings: Settings | None = None) -> None:
        """Forget the learners and start again from ``settings`` (default: the current ones),
        as a new segmenter would, but keep the encoded slices.

        Only settings that leave the features unchanged may differ (not the backbone, its
        weights, device or image size, nor the crop rule).
        """
        settings = settings or self.settings
        same = ("backbone", "model", "checkpoint", "random_init", "device", "image_size", "roi")
        same += ("roi_margin", "roi_min_pad", "roi_min_side")
        changed = [n for n in same if getattr(settings, n) != getattr(self.settings, n)]
        if changed:
            raise ValueError(f"reset() cannot change {', '.join(changed)}: make a new segmenter")
        self.settings = settings
        self._cache.ram_bytes = settings.cache_ram_bytes
        self._segments.clear()
        self._seed(settings.seed)

    def retune(self, settings: Settings) -> None:
        """Propagate next with ``settings``, keeping the fitted learners: only the fields in
        ``settings.PROPAGATION_ONLY`` (and online learning being off) may differ."""
        from .settings import PROPAGATION_ONLY

        if settings.fit_key() != self.settings.fit_key():
            raise ValueError(f"retune() may change only {', '.join(PROPAGATION_ONLY)}: refit")
        if settings.online or self.settings.online:
            raise ValueError("retune() needs online learning off: it changes the learners")
        self.settings = settings
        for seg in self._segments.values():
            seg.last = None  # a local re-run would mix two settings
            if seg.tracker is not None:
                seg.tracker = self.backbone.tracker(settings, seg.tracker.view)
                seg.tracker.condition()

    def _annotated_for(self, value: int) -> list[int]:
        """Slices annotated for segment ``value``: those painted with it, or every named slice
        when the slices were named (then an empty one says "absent here")."""
        ann = self.annotation
        return list(ann.slices) if ann.explicit else list(ann.per_segment.get(value, []))

    @property
    def cached_slices(self) -> list[int]:
        """Slices whose features are in the cache (each was encoded exactly once)."""
        return sorted(self._cache)

    @property
    def fit_decoder_every(self) -> int:
        """Every n-th fit step goes through the decoder (the settings', else the backbone's)."""
        return self.settings.fit_decoder_every or self.backbone.decoder_every

    @property
    def segments(self) -> list[int]:
        """Label values that have a learner."""
        return sorted(self._segments)

    def learner(self, value: int) -> Learner:
        """The learner (mapping network and fusion) of segment ``value``."""
        return self._segments[value].learner

    # ---------------------------------------------------------------- slices
    def _slice(self, data: np.ndarray, t: int) -> np.ndarray:
        return np.take(data, t, axis=self.annotation.axis)

    def _window_slice(self, t: int) -> np.ndarray:
        return vol.apply_window(self._slice(self._array, t), self.window)

    def _n_slices(self) -> int:
        return self._array.shape[self.annotation.axis]

    def _features(self, slices: list[int], progress: Progress | None = None) -> None:
        """Encode the slices not yet cached, in batches."""
        todo = [t for t in slices if t not in self._cache]
        t0 = time.perf_counter()
        bb = self.backbone
        batch = max(1, bb.encode_batch)
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            imgs = np.stack([self.roi.crop(self._window_slice(t)) for t in chunk])
            enc = bb.encode(bb.prepare(imgs))
            for n, t in enumerate(chunk):
                self._cache[t] = (enc.embed[n], [h[n] for h in enc.hires])
            self.encoder_calls += len(chunk)
            if progress is not None:
                progress(ProgressEvent(ENCODE, None, min(start + batch, len(todo)), len(todo)))
        if todo:
            trim_heap()
        self.encode_seconds += time.perf_counter() - t0

    def _get(self, t: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        f, hires = self._cache[t]
        dev = self.backbone.device
        return f[None].to(dev, torch.float32), [h[None].to(dev, torch.float32) for h in hires]

    def _target(self, mask2d: np.ndarray, size: int) -> torch.Tensor:
        crop = torch.from_numpy(self.roi.crop(mask2d.astype(np.float32)))[None, None]
        return F.interpolate(crop, size=(size, size), mode="area")[0]

    def _box(self, mask2d: np.ndarray) -> torch.Tensor | None:
        """Prompt box (input pixels, xyxy) of a full-slice mask, slightly enlarged."""
        box = mask_box(self.roi.crop(mask2d.astype(bool)), self.settings.box_enlarge, pad=1)
        if box is None:
            return None
        box = np.asarray(box, dtype=float) * (self.backbone.input_size / float(self.roi.side))
        return torch.tensor(np.clip(box, 0, self.backbone.input_size), dtype=torch.float32)

    def _to_slice(self, logits: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
        """Low-resolution logits (L, L) in ROI space -> full-slice logits."""
        up = F.interpolate(
            logits[None, None].float(), size=(self.roi.side, self.roi.side), mode="bilinear"
        )
        return self.roi.paste(up[0, 0].numpy(), shape, fill=NOT_DECODED_LOGIT)

    # ---------------------------------------------------------------- fit
    def fit(
        self,
        sparse_labels: np.ndarray,
        slices: list[int] | None = None,
        axis: int | str = "auto",
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        """Train one learner per segment on the annotated slices (warm start on a second call)."""
        if self._array is None:
            raise InputError("set_volume() first")
        sparse = np.asarray(sparse_labels)
        if sparse.shape != self._array.shape:
            raise InputError(
                f"labels {sparse.shape} and volume {self._array.shape} differ in shape"
            )
        sparse = vol.as_labels(sparse, "labels")
        ann = vol.find_annotated(sparse, axis, slices)
        t0 = time.perf_counter()
        enc0 = self.encode_seconds
        self.annotation = ann
        self._sparse = sparse
        self._place(sparse, ann.axis)
        self._features(ann.slices, progress)
        for value in ann.per_segment:
            _check(cancel, "fitting was cancelled")
            self._fit_segment(value, progress, cancel)
            _check(cancel, "fitting was cancelled")
        for value in list(self._segments):
            if value not in ann.per_segment:
                del self._segments[value]
        self.fit_seconds = time.perf_counter() - t0 - (self.encode_seconds - enc0)
        self._fit_encode_seconds = self.encode_seconds - enc0
        trim_heap()

    def _place(self, sparse: np.ndarray, axis: int) -> None:
        """Window and crop for this painting; a change of either (or of the axis) empties the cache."""
        painted = np.any(sparse > 0, axis=axis)
        window = self.window or vol.intensity_window(self._array, self.modality, sparse > 0)
        roi = self.roi
        if roi is None or not roi.contains(painted):
            s = self.settings
            roi = compute_roi(painted, s.roi, s.roi_margin, s.roi_min_pad, s.roi_min_side)
        key = (axis, roi, window)
        if key != self._cache_key:
            self._cache.clear()
            self._segments.clear()
        self._cache_key, self.roi, self.window = key, roi, window

    def _fit_segment(
        self, value: int, progress: Progress | None, cancel: threading.Event | None
    ) -> None:
        s = self.settings
        seg = self._segments.get(value)
        warm = seg is not None
        if seg is None:
            with _private_rng(state=self._init_rng):
                learner = Learner(self.backbone.embed_shape[0])
                self._init_rng = torch.get_rng_state()
            learner.to(self.backbone.device)
            optimizer = torch.optim.Adam(learner.parameters(), lr=s.learning_rate)
            seg = self._segments[value] = _Segment(value, learner, optimizer)
        seg.tracker = self.backbone.tracker(s, _View(self, value))
        seg.tracker.condition()
        samples = seg.anchors = self._annotated_samples(seg)
        if not samples:
            return
        steps = self.backbone.default_fit_steps() if s.fit_steps is None else s.fit_steps
        if warm:
            steps = max(s.warm_min_steps, steps // s.warm_divisor)

        def report(done: int, total: int) -> None:
            if progress is not None:
                progress(ProgressEvent(FIT, value, done, total))

        seg.losses = train_steps(
            seg.learner,
            self.backbone,
            seg.optimizer,
            samples,
            steps,
            self._gen,
            s,
            decoder_every=self.fit_decoder_every,
            cancel=cancel,
            progress=report,
        )
        seg.buffer.clear()

    def _annotated_samples(self, seg: _Segment) -> list[Sample]:
        out = []
        for a in seg.tracker.view.annotated:
            mask = self._slice(self._sparse, a) == seg.value
            use, box = seg.tracker.training_box(mask)
            if not use:
                continue
            f, hires = self._get(a)
            p = seg.tracker.training_memory(a, f)
            target = self._target(mask, self.backbone.mask_size)
            out.append(_sample(f, p, hires, target, box))
        return out

    # ---------------------------------------------------------------- propagate
    def propagate(
        self, progress: Progress | None = None, cancel: threading.Event | None = None
    ) -> Result:
        """Segment the whole volume; raises Cancelled (and returns nothing) when cancelled."""
        if self.annotation is None:
            raise InputError("fit() first")
        ann = self.annotation
        t0 = time.perf_counter()
        enc0 = self.encode_seconds
        calls0 = self.encoder_calls
        n = self._n_slices()
        plane = self._slice(self._sparse, 0).shape
        probs: dict[int, dict[int, np.ndarray]] = {}
        conf = np.full(n, np.nan)
        disagreement = np.full(n, np.nan)
        predicted: dict[int, list[int]] = {}
        updates = 0
        recomputed: dict[int, list[int]] = {}
        runs = {}
        for value, seg in self._segments.items():
            run, recomputed[value] = self._propagate_local(seg, plane, progress, cancel)
            runs[value] = run
        for value, run in runs.items():  # kept only once every segment has finished
            seg = self._segments[value]
            seg.last = run
            view = seg.tracker.view
            seg.last_painted = {a: view.painted(a) for a in view.annotated}
            updates += run.updates
            probs[value] = run.logits
            predicted[value] = sorted(run.logits)
            for t, c in run.confidence.items():
                conf[t] = c if np.isnan(conf[t]) else min(conf[t], c)
            for t, d in run.disagreement.items():
                disagreement[t] = d if np.isnan(disagreement[t]) else max(disagreement[t], d)
        labels = self._decide(probs)
        enc = self.encode_seconds - enc0
        timings = {
            "encode": enc + self._fit_encode_seconds,
            "fit": self.fit_seconds,
            "propagate": time.perf_counter() - t0 - enc,
        }
        return Result(
            labels=labels,
            confidence=conf,
            axis=ann.axis,
            annotated=list(ann.slices),
            timings=timings,
            encoded_slices=self.encoder_calls - calls0,
            predicted_slices=predicted,
            voxels={v: int(np.count_nonzero(labels == v)) for v in self._segments},
            losses={v: s.losses for v, s in self._segments.items()},
            online_updates=updates,
            disagreement=disagreement,
            recomputed=recomputed,
        )

    def _decide(self, probs: dict[int, dict[int, np.ndarray]]) -> np.ndarray:
        """Overlaps go to the most probable segment; annotated slices exactly as given."""
        labels = np.zeros_like(self._sparse)
        for t in sorted({t for p in probs.values() for t in p}):
            values = [v for v in probs if t in probs[v]]
            stack = np.stack([probs[v][t] for v in values])
            best = np.argmax(stack, axis=0)
            fg = np.max(stack, axis=0) > 0
            out = np.where(fg, np.asarray(values, np.uint8)[best], 0).astype(np.uint8)
            self._put(labels, t, out)
        ann = self.annotation
        for a in ann.slices:
            painted = self._slice(self._sparse, a)
            if ann.explicit:  # named slices are fully annotated
                self._put(labels, a, painted)
            else:  # the paint wins; other segments' predictions keep the rest of the slice
                plane = self._slice(labels, a)
                self._put(labels, a, np.where(painted > 0, painted, plane))
        return labels

    def _put(self, labels: np.ndarray, t: int, plane: np.ndarray) -> None:
        idx = [slice(None)] * 3
        idx[self.annotation.axis] = t
        labels[tuple(idx)] = plane

    def _propagate_local(
        self,
        seg: _Segment,
        plane: tuple[int, int],
        progress: Progress | None,
        cancel: threading.Event | None,
    ) -> tuple[_SegmentRun, list[int]]:
        """After a correction, re-run only what the changed slices can change: the intervals
        between their painted neighbours, and the walk beyond the range on a side whose end
        moved. The rest of the last result is kept (decoded with the learner as it was)."""
        regions = self._changed_regions(seg) if self.settings.local else None
        if regions is None:
            run = self._propagate_segment(seg, plane, progress, cancel)
            return run, sorted(run.logits)
        run = _SegmentRun(
            logits=dict(seg.last.logits),
            confidence=dict(seg.last.confidence),
            disagreement=dict(seg.last.disagreement),
        )
        ann = seg.tracker.view.annotated
        for t in ann:  # now painted: the paint decides
            for part in (run.logits, run.confidence, run.disagreement):
                part.pop(t, None)
        n = self._n_slices()
        walk = _Walk(
            total=sum((n if q is None else q) - (0 if p is None else p) for p, q in regions)
        )
        done: list[int] = []
        for p, q in regions:
            for part in (run.logits, run.confidence, run.disagreement):
                for t in [t for t in part if (p is None or t > p) and (q is None or t < q)]:
                    del part[t]
            if p is not None and q is not None:  # between two painted slices: both walks
                fwd = self._walk(seg, p, +1, q, plane, walk, progress, cancel, until=q)
                bwd = self._walk(seg, q, -1, p, plane, walk, progress, cancel, until=p)
            elif q is not None:  # below the lowest painted slice: its walk beyond
                fwd, bwd = {}, self._walk(seg, q, -1, q, plane, walk, progress, cancel)
            else:  # above the highest
                fwd, bwd = self._walk(seg, p, +1, p, plane, walk, progress, cancel), {}
            self._blend(seg, fwd, bwd, run)
            done += sorted(set(fwd) | set(bwd))
        run.updates = walk.updates
        return run, sorted(done)

    def _changed_regions(self, seg: _Segment) -> list[tuple[int | None, int | None]] | None:
        """Open intervals (None: the volume's edge) that the changes since the last run can
        change; None when a full run is needed (no last run, a slice removed, an empty one)."""
        if seg.last is None:
            return None
        view = seg.tracker.view
        ann = view.annotated
        old = seg.last_painted
        if set(old) - set(ann):
            return None  # an unpainted slice: its neighbours' interval spans old results
        now = {a: view.painted(a) for a in ann}
        changed = [a for a in ann if a not in old or not np.array_equal(old[a], now[a])]
        if any(not now[a].any() for a in changed):
            return None  # a slice painted empty ends walks: leave that to a full run
        painted = [a for a in ann if now[a].any()]
        regions = set()
        for c in changed:
            below = [a for a in ann if a < c]
            above = [a for a in ann if a > c]
            regions.add((below[-1] if below else None, c))
            regions.add((c, above[0] if above else None))
        ends = [x for r in regions for x in r if x is not None]
        if any(x not in painted for x in ends):
            return None  # a slice named empty bounds the interval: its walks end differently
        return sorted(regions, key=lambda r: -1 if r[0] is None else r[0])

    def _propagate_segment(
        self,
        seg: _Segment,
        plane: tuple[int, int],
        progress: Progress | None,
        cancel: threading.Event | None,
    ) -> _SegmentRun:
        s = self.settings
        ann = seg.tracker.view.annotated
        painted = [a for a in ann if np.any(self._slice(self._sparse, a) == seg.value)]
        lo, hi = painted[0], painted[-1]
        self._features(list(range(lo, hi + 1)), progress)
        inner = hi - lo + 1 - len([a for a in ann if lo <= a <= hi])
        walk = _Walk(total=2 * inner + 2 * s.stop_after + 2)
        fwd = self._walk(seg, lo, +1, hi, plane, walk, progress, cancel)
        bwd = self._walk(seg, hi, -1, lo, plane, walk, progress, cancel)
        run = _SegmentRun(updates=walk.updates)
        self._blend(seg, fwd, bwd, run)
        return run

    def _blend(self, seg: _Segment, fwd: dict, bwd: dict, run: _SegmentRun) -> None:
        """The two walks into ``run``: blended by distance where both reached a slice."""
        ann = seg.tracker.view.annotated
        logits, conf = run.logits, run.confidence
        for t in set(fwd) | set(bwd):
            if t in fwd and t in bwd:  # between painted slices: blend by distance
                run.disagreement[t] = 1.0 - _dice(fwd[t][0] > 0, bwd[t][0] > 0)
                a = max(x for x in ann if x < t)
                b = min(x for x in ann if x > t)
                w = (b - t) / float(b - a)
                logits[t] = w * fwd[t][0] + (1 - w) * bwd[t][0] + self._prior(seg, t)
                conf[t] = w * fwd[t][1] + (1 - w) * bwd[t][1]
            else:
                logits[t], conf[t] = fwd[t] if t in fwd else bwd[t]

    def _prior(self, seg: _Segment, t: int) -> np.ndarray | float:
        """Interpolation prior as logits: the model overrides it only where it is confident."""
        s = self.settings
        if s.prior_weight <= 0:
            return 0.0
        d = seg.tracker.view.distance(t)
        return s.prior_weight * np.clip(-d / s.prior_scale, -4.0, 4.0)

    def _walk(
        self,
        seg: _Segment,
        start: int,
        step: int,
        inner_end: int,
        plane: tuple[int, int],
        walk: _Walk,
        progress: Progress | None,
        cancel: threading.Event | None,
        until: int | None = None,
    ) -> dict[int, tuple[np.ndarray, float]]:
        """Walk from ``start`` in direction ``step``; inside the painted range up to ``inner_end``,
        beyond it until the structure has been absent for ``stop_after`` slices (or up to
        ``until``, exclusive)."""
        ann = set(seg.tracker.view.annotated)
        n = self._n_slices()
        out: dict[int, tuple[np.ndarray, float]] = {}
        absent = 0
        previous = self._slice(self._sparse, start) == seg.value
        seg.tracker.start(seg.learner, start, step)
        t = start + step
        while 0 <= t < n and t != until:
            beyond = (t - inner_end) * step > 0
            if t in ann:
                if beyond:
                    break  # an annotated slice beyond the painted range says where it is not
                previous = self._slice(self._sparse, t) == seg.value
                t += step
                continue
            if beyond and not self.settings.extend:
                break
            if beyond and absent >= self.settings.stop_after:
                break
            _check(cancel, "propagation was cancelled; nothing was written")
            full, pred = self._step(seg, t, step, beyond, previous, plane, walk)
            out[t] = (full, pred.confidence)
            previous = full > 0
            absent = 0 if pred.present else absent + 1
            walk.done += 1
            if progress is not None:
                progress(
                    ProgressEvent(PROPAGATE, seg.value, min(walk.done, walk.total), walk.total)
                )
            t += step
        return out

    def _step(
        self,
        seg: _Segment,
        t: int,
        step: int,
        beyond: bool,
        previous: np.ndarray,
        plane: tuple[int, int],
        walk: _Walk,
    ) -> tuple[np.ndarray, Prediction]:
        """One slice: encode if needed, the tracker's step and memory write, the online buffer."""
        if t not in self._cache:
            ann = seg.tracker.view.annotated
            ahead = [t + step * k for k in range(self.backbone.encode_batch)]
            self._features([a for a in ahead if 0 <= a < self._n_slices() and a not in ann])
        f, hires = self._get(t)
        pred = seg.tracker.step(seg.learner, t, f, hires, beyond, previous)
        full = self._to_slice(pred.logits, plane)
        seg.tracker.remember(t, f, pred)
        s = self.settings
        teach = s.online_scope == "all" or not beyond
        if s.online and teach and pred.present and pred.confidence >= s.gamma:
            self._learn_online(seg, f, hires, pred, walk)
        return full, pred

    def _learn_online(
        self,
        seg: _Segment,
        f: torch.Tensor,
        hires: list[torch.Tensor],
        pred: Prediction,
        walk: _Walk,
    ) -> None:
        """A confident prediction joins the buffer; every few of them the learner takes a step."""
        s = self.settings
        target = (torch.sigmoid(pred.logits)[None] > 0.5).float()
        seg.buffer.append(_sample(f, pred.memory, hires, target, pred.box))
        seg.buffer = seg.buffer[-s.buffer_size :]
        walk.since_update += 1
        if walk.since_update < s.online_every:
            return
        k = min(s.online_picks, len(seg.buffer))
        idx = torch.randperm(len(seg.buffer), generator=self._gen)[:k].tolist()
        samples = seg.anchors + [seg.buffer[i] for i in idx]
        train_steps(
            seg.learner,
            self.backbone,
            seg.optimizer,
            samples,
            s.online_steps,
            self._gen,
            s,
            batch=len(samples),
            patience=None,
        )
        walk.since_update = 0
        walk.updates += 1

    # ---------------------------------------------------------------- learner files
    def save_learner(self, path: str | Path, meta: dict | None = None) -> None:
        """The current learners as a learner file (no pickle, see :mod:`.learner_file`);
        ``meta`` (:func:`.transfer.learner_meta`) says how to apply them to another volume."""
        from . import learner_file
        from .transfer import learner_meta

        tensors = {v: seg.learner.state_dict() for v, seg in self._segments.items()}
        if meta is None:
            meta = learner_meta(self, {v: f"segment {v}" for v in tensors}, {}, {})
        learner_file.save(learner_file.LearnerFile(tensors, meta), path)

    def load_learner_state(self, path: str | Path) -> dict:
        """A learner file made for this backbone warm-starts the next fit of this volume
        (:meth:`warm_start`); returns the file's metadata."""
        from . import learner_file
        from .transfer import learners_from, model_name, window_for

        if self._array is None:
            raise InputError("set_volume() first: the learner's window depends on the volume")
        lf = learner_file.load(path)
        learner_file.check_backbone(lf, self.backbone.name, model_name(self.settings), path)
        window = window_for(lf, self._array, self.modality)
        self.warm_start(learners_from(lf, self.backbone), lf.axis, window)
        return lf.meta

    def warm_start(
        self, learners: dict[int, Learner], axis: int, window: tuple[float, float]
    ) -> None:
        """Learners trained elsewhere become this volume's, warm for the next :meth:`fit`
        (on painted slices or on seeds), with the window and slice axis they were trained
        with and the whole slice as the crop: a crop that depends on painting would change
        the features they were trained on. Re-seeds, so a volume's result does not depend
        on what the segmenter did before."""
        if self._array is None:
            raise InputError("set_volume() first")
        roi = compute_roi(np.zeros(np.delete(self._array.shape, axis), bool), "none")
        key = (axis, roi, (float(window[0]), float(window[1])))
        if key != self._cache_key:
            self._cache.clear()
        self._cache_key, self.roi, self.window = key, roi, key[2]
        self.annotation = vol.Annotation(axis, [], {})  # until fit(): the axis to read slices
        lr = self.settings.learning_rate
        self._segments = {
            v: _Segment(v, m.to(self.backbone.device), torch.optim.Adam(m.parameters(), lr=lr))
            for v, m in learners.items()
        }
        self._seed(self.settings.seed)

    def encode(self, slices: list[int], progress: Progress | None = None) -> None:
        """Encode ``slices`` along the axis now (cached; see :meth:`features`)."""
        self._features(list(slices), progress)

    def features(self, t: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Slice ``t``'s features (encoded first if needed), float32 on the backbone's device."""
        self._features([t])
        return self._get(t)

    def to_slice(self, logits: torch.Tensor, plane: tuple[int, int]) -> np.ndarray:
        """Decoder logits (L, L) of the crop -> logits on the whole slice of shape ``plane``."""
        return self._to_slice(logits, plane)

    def anchors(self, value: int) -> list[Sample]:
        """The training samples the last fit made of segment ``value``'s annotated slices."""
        return list(self._segments[value].anchors)


def _sample(f, p, hires, target, box) -> Sample:
    """A training slice as the buffers keep it: float16 on the CPU."""
    return Sample(
        f[0].to("cpu", torch.float16),
        p[0].to("cpu", torch.float16),
        [h[0].to("cpu", torch.float16) for h in hires],
        target,
        box.cpu() if box is not None else None,
    )


@contextlib.contextmanager
def _private_rng(seed: int | None = None, state: torch.Tensor | None = None):
    """Run torch's global-RNG draws (module initialisers) from a seed or a saved state, then
    give the host process its global RNG back as it was."""
    with torch.random.fork_rng(devices=[]):
        if state is not None:
            torch.set_rng_state(state)
        elif seed is not None:
            torch.manual_seed(seed)
        yield


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def _check(cancel: threading.Event | None, message: str) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled(message)
