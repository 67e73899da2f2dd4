"""The public API: one OFLSegmenter per volume (fit / propagate / save / load).

The segmenter owns the feature cache: every slice that is needed is encoded once,
stored as float16 and read by fitting, propagation, re-propagation and online updates.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import volume as vol
from .backbones import build_backbone
from .errors import Cancelled, InputError
from .learner import Learner
from .roi import Roi, compute_roi
from .training import Sample, train_steps

Progress = Callable[[str, int, int], None]

LEARNER_FORMAT = "oflsam2-learner-1"


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
    predicted_slices: dict[int, list[int]] = field(
        default_factory=dict
    )  # segment -> slices predicted
    voxels: dict[int, int] = field(default_factory=dict)  # segment -> voxel count
    losses: dict[int, list[float]] = field(default_factory=dict)  # segment -> fit losses
    online_updates: int = 0


@dataclass
class _Segment:
    value: int
    learner: Learner
    optimizer: torch.optim.Optimizer
    buffer: list[Sample] = field(default_factory=list)
    anchors: list[Sample] = field(
        default_factory=list
    )  # the annotated slices, always in online batches
    losses: list[float] = field(default_factory=list)


class OFLSegmenter:
    """OFL-SAM2 on one volume.

    ``set_volume`` (lazy: nothing is encoded yet), ``fit`` (trains one learner per
    segment on the annotated slices), ``propagate`` (walks out from the annotated
    slices with the backbone's memory, fusing learned target features, updating the
    learner online). Calling ``fit`` + ``propagate`` again after a correction reuses the
    feature cache and warm-starts the learners.
    """

    def __init__(
        self,
        backbone: str = "sam2",
        model: str = "sam2.1_hiera_tiny",
        checkpoint: str | None = None,
        random_init: bool = False,
        device: str = "auto",
        image_size: int = 1024,
        online: bool = True,
        gamma: float = 0.9,
        roi: str = "auto",
        seed: int = 0,
        fit_steps: int | None = None,
        stop_after: int = 3,
        online_every: int = 4,
        online_steps: int = 2,
        prior: str | None = None,
    ) -> None:
        if roi not in ("auto", "none"):
            raise InputError(f"--roi must be auto or none, not {roi!r}")
        if not 0.0 < gamma < 1.0:
            raise InputError(f"gamma must lie between 0 and 1, not {gamma}")
        self.backbone_name = backbone
        self.backbone = build_backbone(
            backbone,
            model=model,
            checkpoint=checkpoint,
            random_init=random_init,
            device=device,
            image_size=image_size,
        )
        self.online = online
        self.gamma = gamma
        self.roi_mode = roi
        self.seed = seed
        self.fit_steps = fit_steps
        self.stop_after = stop_after
        self.online_every = online_every
        self.online_steps = online_steps
        # Interpolation prior between painted slices: where it was measured to win (see bench/accuracy.py).
        self.prior = (
            prior if prior is not None else ("interp" if not self.backbone.has_memory else "none")
        )
        self.encoder_calls = 0
        self._array: np.ndarray | None = None
        self.geometry: vol.Geometry | None = None
        self.modality: str | None = None
        self._cache: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self._cache_key: tuple | None = None
        self._cond_cache: dict[
            int, dict[int, dict]
        ] = {}  # segment -> annotated slice -> SAM2 memory
        self._segments: dict[int, _Segment] = {}
        self._sparse: np.ndarray | None = None
        self.annotation: vol.Annotation | None = None
        self.window: tuple[float, float] | None = None
        self.roi: Roi | None = None
        self._gen = torch.Generator().manual_seed(seed)
        self.fit_seconds = 0.0
        self.encode_seconds = 0.0  # all encoding so far; fit and propagate timings exclude it
        self._fit_encode_seconds = 0.0
        torch.manual_seed(seed)

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
            self._cond_cache.clear()
            self._cache_key = None
            self._segments.clear()
            self.window = None
            self.roi = None
        self._array = array
        self.geometry = geometry
        self.modality = modality

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
        batch = max(1, getattr(bb, "encode_batch", 4))
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            imgs = np.stack([self.roi.crop(self._window_slice(t)) for t in chunk])
            enc = bb.encode(bb.prepare(imgs))
            for n, t in enumerate(chunk):
                self._cache[t] = (
                    enc.embed[n].to("cpu", torch.float16),
                    [h[n].to("cpu", torch.float16) for h in enc.hires],
                )
            self.encoder_calls += len(chunk)
            if progress is not None:
                progress("encode", min(start + batch, len(todo)), len(todo))
        self.encode_seconds += time.perf_counter() - t0

    def _get(self, t: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        f, hires = self._cache[t]
        dev = self.backbone.device
        return f[None].to(dev, torch.float32), [h[None].to(dev, torch.float32) for h in hires]

    def _target(self, mask2d: np.ndarray, size: int) -> torch.Tensor:
        crop = torch.from_numpy(self.roi.crop(mask2d.astype(np.float32)))[None, None]
        return F.interpolate(crop, size=(size, size), mode="area")[0]

    def _box(self, mask2d: np.ndarray, enlarge: float = 0.05) -> torch.Tensor | None:
        """Prompt box (input pixels, xyxy) of a full-slice mask, slightly enlarged."""
        crop = self.roi.crop(mask2d.astype(bool))
        rows, cols = np.nonzero(crop)
        if rows.size == 0:
            return None
        s = self.backbone.input_size / float(self.roi.side)
        x0, x1 = cols.min(), cols.max() + 1
        y0, y1 = rows.min(), rows.max() + 1
        pad_x, pad_y = enlarge * (x1 - x0) + 1, enlarge * (y1 - y0) + 1
        box = np.array([x0 - pad_x, y0 - pad_y, x1 + pad_x, y1 + pad_y]) * s
        return torch.tensor(np.clip(box, 0, self.backbone.input_size), dtype=torch.float32)

    def _to_slice(self, logits: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
        """Low-resolution logits (L, L) in ROI space -> full-slice logits."""
        up = F.interpolate(
            logits[None, None].float(), size=(self.roi.side, self.roi.side), mode="bilinear"
        )
        return self.roi.paste(up[0, 0].numpy(), shape, fill=-20.0)

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
        painted = np.any(sparse > 0, axis=ann.axis)
        window = self.window or vol.intensity_window(self._array, self.modality, sparse > 0)
        roi = self.roi
        if roi is None or not roi.contains(painted):
            roi = compute_roi(painted, self.roi_mode)
        key = (ann.axis, roi, window)
        self._cond_cache.clear()  # the annotated masks may have changed
        if key != self._cache_key:
            self._cache.clear()
            self._segments.clear()
        self._cache_key, self.roi, self.window = key, roi, window
        self._features(ann.slices, progress)
        for value in ann.per_segment:
            if cancel is not None and cancel.is_set():
                raise Cancelled("fitting was cancelled")
            seg = self._segments.get(value)
            warm = seg is not None
            if seg is None:
                learner = Learner(self.backbone.embed_shape[0]).to(self.backbone.device)
                seg = _Segment(value, learner, torch.optim.Adam(learner.parameters(), lr=1e-3))
                self._segments[value] = seg
            samples = seg.anchors = self._annotated_samples(value)
            if not samples:
                continue
            steps = self.fit_steps or self._default_steps()
            if warm:
                steps = max(10, steps // 3)

            def prog(done: int, total: int, v: int = value) -> None:
                if progress is not None:
                    progress(f"fit segment {v}", done, total)

            seg.losses = train_steps(
                seg.learner,
                self.backbone,
                seg.optimizer,
                samples,
                steps,
                self._gen,
                decoder_every=self._decoder_every(),
                cancel=cancel,
                progress=prog,
            )
            seg.buffer.clear()
            if cancel is not None and cancel.is_set():
                raise Cancelled("fitting was cancelled")
        for value in list(self._segments):
            if value not in ann.per_segment:
                del self._segments[value]
        self.fit_seconds = time.perf_counter() - t0 - (self.encode_seconds - enc0)
        self._fit_encode_seconds = self.encode_seconds - enc0

    def _default_steps(self) -> int:
        # Measured on 2 idle CPU cores: a frozen SAM2 decoder step on 4 slices takes ~0.12 s at 512 and
        # ~0.6 s at 1024; LiteMedSAM's decoder (64 x 64 tokens, 256 x 256 masks) sits in between.
        if self.backbone.device.type != "cpu":
            return 150
        if not self.backbone.has_memory:
            return 60
        return 80 if self.backbone.input_size <= 512 else 45

    def _decoder_every(self) -> int:
        """Box-prompted models lean on the coarse head (presence, box), which trains without the decoder."""
        return 1 if self.backbone.has_memory else 3

    def _cond_bank(self, value: int, exclude: int | None = None) -> dict:
        """SAM2 memory bank holding the annotated slices (their masks) as conditioning frames."""
        bank = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        if not self.backbone.has_memory:
            return bank
        cache = self._cond_cache.setdefault(value, {})
        s = self.backbone.input_size
        for a in self.annotation.slices:
            if a == exclude:
                continue
            if a not in cache:
                f, hires = self._get(a)
                mask = self._target(self._slice(self._sparse, a) == value, s)[None]
                cache[a] = self.backbone.memory_from_mask(f, hires, (mask > 0.5).float())
            bank["cond_frame_outputs"][a] = cache[a]
        return bank

    def _memory(self, f: torch.Tensor, t: int, bank: dict, reverse: bool) -> torch.Tensor:
        if not self.backbone.has_memory:
            return f
        return self.backbone.memory_features(f, t, bank, self._n_slices(), reverse)

    def _annotated_samples(self, value: int) -> list[Sample]:
        out = []
        for a in self.annotation.slices:
            mask = self._slice(self._sparse, a) == value
            box = self._box(mask)
            if not self.backbone.has_memory and box is None:
                continue  # a box-prompted model cannot learn "absent" through its decoder
            f, hires = self._get(a)
            p = self._memory(f, a, self._cond_bank(value, exclude=a), reverse=False)
            target = self._target(mask, self.backbone.mask_size)
            out.append(_sample(f, p, hires, target, box if not self.backbone.has_memory else None))
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
        predicted: dict[int, list[int]] = {}
        updates = 0
        for value, seg in self._segments.items():
            slices_logits, seg_conf, upd = self._propagate_segment(seg, plane, progress, cancel)
            updates += upd
            probs[value] = slices_logits
            predicted[value] = sorted(slices_logits)
            for t, c in seg_conf.items():
                conf[t] = c if np.isnan(conf[t]) else min(conf[t], c)
        labels = np.zeros_like(self._sparse)
        for t in sorted({t for p in probs.values() for t in p}):
            values = [v for v in probs if t in probs[v]]
            stack = np.stack([probs[v][t] for v in values])
            best = np.argmax(stack, axis=0)
            fg = np.max(stack, axis=0) > 0
            out = np.where(fg, np.asarray(values, np.uint8)[best], 0).astype(np.uint8)
            self._put(labels, t, out)
        for a in ann.slices:  # annotated slices exactly as given
            self._put(labels, a, self._slice(self._sparse, a))
        enc = self.encode_seconds - enc0
        timings = {
            "encode": enc + self._fit_encode_seconds,
            "fit": self.fit_seconds,
            "propagate": time.perf_counter() - t0 - enc,
        }
        voxels = {v: int(np.count_nonzero(labels == v)) for v in self._segments}
        return Result(
            labels,
            conf,
            ann.axis,
            list(ann.slices),
            timings,
            self.encoder_calls - calls0,
            predicted,
            voxels,
            {v: s.losses for v, s in self._segments.items()},
            updates,
        )

    def _put(self, labels: np.ndarray, t: int, plane: np.ndarray) -> None:
        idx = [slice(None)] * 3
        idx[self.annotation.axis] = t
        labels[tuple(idx)] = plane

    def _propagate_segment(self, seg: _Segment, plane: tuple[int, int], progress, cancel):
        ann = self.annotation.slices
        value = seg.value
        painted = [a for a in ann if np.any(self._slice(self._sparse, a) == value)]
        lo, hi = painted[0], painted[-1]
        self._features(list(range(lo, hi + 1)), progress)
        total = (hi - lo + 1 - len([a for a in ann if lo <= a <= hi])) * 2 + 2 * self.stop_after + 2
        state = {"done": 0, "total": total, "since_update": 0, "updates": 0}
        # Beyond the outermost painted slices walk at most half the mean gap between painted slices:
        # painting that dense says no more about the structure's ends (and vertebrae look alike).
        if len(painted) > 1:
            state["max_beyond"] = max(2, int(np.ceil(0.5 * (hi - lo) / (len(painted) - 1))))
        else:
            state["max_beyond"] = self._n_slices()
        fwd = self._walk(seg, lo, +1, hi, plane, state, progress, cancel)
        bwd = self._walk(seg, hi, -1, lo, plane, state, progress, cancel)
        logits: dict[int, np.ndarray] = {}
        conf: dict[int, float] = {}
        for t in set(fwd) | set(bwd):
            if t in fwd and t in bwd:
                a = max(x for x in ann if x < t)
                b = min(x for x in ann if x > t)
                w = (b - t) / float(b - a)
                logits[t] = w * fwd[t][0] + (1 - w) * bwd[t][0]
                conf[t] = w * fwd[t][1] + (1 - w) * bwd[t][1]
            else:
                logits[t], conf[t] = fwd[t] if t in fwd else bwd[t]
        return logits, conf, state["updates"]

    def _walk(
        self, seg, start, step, inner_end, plane, state, progress, cancel
    ) -> dict[int, tuple[np.ndarray, float]]:
        """Walk from ``start`` in direction ``step``; inside the painted range up to ``inner_end``,
        beyond it until the structure has been absent for ``stop_after`` slices."""
        ann = set(self.annotation.slices)
        value = seg.value
        n = self._n_slices()
        bank = self._cond_bank(value)
        reverse = step < 0
        out: dict[int, tuple[np.ndarray, float]] = {}
        absent = 0
        prev_mask: np.ndarray | None = self._slice(self._sparse, start) == value
        # Presence yardstick of box-prompted backbones, from the learner as this walk starts.
        ref_coarse = None if self.backbone.has_memory else self._coarse_ref(seg, value)
        t = start + step
        while 0 <= t < n:
            beyond = (t - inner_end) * step > 0
            if t in ann:
                if beyond:
                    break  # an annotated slice beyond the painted range says where the structure is not
                prev_mask = self._slice(self._sparse, t) == value
                t += step
                continue
            if beyond and (absent >= self.stop_after or abs(t - inner_end) > state["max_beyond"]):
                break
            if cancel is not None and cancel.is_set():
                raise Cancelled("propagation was cancelled; nothing was written")
            if t not in self._cache:
                ahead = [t + step * k for k in range(getattr(self.backbone, "encode_batch", 4))]
                self._features([s for s in ahead if 0 <= s < n and s not in ann])
            f, hires = self._get(t)
            with torch.no_grad():
                p = self._memory(f, t, bank, reverse)
                fused, coarse = seg.learner(f, p)
                box = None
                if not self.backbone.has_memory:
                    box = self._prompt_box(seg, t, beyond, prev_mask, coarse, ref_coarse)
                    if box is None:
                        dec = None
                    else:
                        dec = self.backbone.decode(
                            fused, hires, boxes=box[None].to(self.backbone.device)
                        )
                else:
                    dec = self.backbone.decode(fused, hires)
            if dec is None:
                logits_small = torch.full((self.backbone.mask_size,) * 2, -20.0)
                confidence, present = 1.0, False
            else:
                logits_small = dec.logits[0, 0].cpu()
                present = bool((logits_small > 0).any())
                if self.backbone.has_memory and not self.backbone.random_weights:
                    present = present and float(dec.object_score[0]) > 0
                if not present:
                    logits_small = torch.minimum(logits_small, torch.tensor(-1.0))
                confidence = _confidence(logits_small, dec.iou[0], self.backbone.random_weights)
            full = self._to_slice(logits_small, plane)
            out[t] = (full, confidence)
            prev_mask = full > 0
            if self.backbone.has_memory and dec is not None:
                if self.backbone.random_weights:
                    # Random weights declare "no object" everywhere; decide presence from the mask instead.
                    dec.object_score = torch.full_like(dec.object_score, 1.0 if present else -1.0)
                bank["non_cond_frame_outputs"][t] = self.backbone.memory_from_prediction(f, dec)
                old = t - step * 16
                bank["non_cond_frame_outputs"].pop(old, None)
            absent = 0 if present else absent + 1
            if self.online and present and confidence >= self.gamma:
                target = (torch.sigmoid(logits_small)[None] > 0.5).float()
                seg.buffer.append(_sample(f, p, hires, target, box))
                seg.buffer = seg.buffer[-16:]
                state["since_update"] += 1
                if state["since_update"] >= self.online_every:
                    self._online_update(seg)
                    state["since_update"] = 0
                    state["updates"] += 1
            state["done"] += 1
            if progress is not None:
                progress(
                    f"propagate segment {value}", min(state["done"], state["total"]), state["total"]
                )
            t += step
        return out

    def _coarse_ref(self, seg: _Segment, value: int) -> float:
        """Mean coarse-head area on the painted slices: the yardstick for 'the structure is gone'."""
        areas = []
        with torch.no_grad():
            for a in self.annotation.slices:
                if not np.any(self._slice(self._sparse, a) == value):
                    continue
                f, _ = self._get(a)
                _, coarse = seg.learner.mapping(f)
                areas.append(float((coarse > 0).sum()))
        return float(np.mean(areas)) if areas else 0.0

    def _prompt_box(self, seg, t, beyond, prev_mask, coarse, ref_coarse) -> torch.Tensor | None:
        """Box prompt for models that need one (LiteMedSAM)."""
        coarse_mask = (coarse[0, 0] > 0).cpu().numpy()
        if not beyond and self.prior == "interp":
            shape = self._interpolated(seg.value, t)
            box = self._box(shape)
            if box is not None:
                return box
        if (
            beyond
            and ref_coarse is not None
            and ref_coarse > 0
            and coarse_mask.sum() < 0.1 * ref_coarse
        ):
            return None  # the learned presence head says the structure ends here
        if prev_mask is not None and prev_mask.any():
            return self._box(prev_mask)
        return None

    def _interpolated(self, value: int, t: int) -> np.ndarray:
        """Shape between the two nearest annotated slices by signed-distance interpolation."""
        from scipy import ndimage

        ann = self.annotation.slices
        a = max(x for x in ann if x < t)
        b = min(x for x in ann if x > t)
        ma = self._slice(self._sparse, a) == value
        mb = self._slice(self._sparse, b) == value

        def sdf(m: np.ndarray) -> np.ndarray:
            if not m.any():
                return np.full(m.shape, 1e3)
            return ndimage.distance_transform_edt(~m) - ndimage.distance_transform_edt(m)

        w = (t - a) / float(b - a)
        return (1 - w) * sdf(ma) + w * sdf(mb) < 0

    def _online_update(self, seg: _Segment) -> None:
        anchors = seg.anchors
        k = min(2, len(seg.buffer))
        idx = torch.randperm(len(seg.buffer), generator=self._gen)[:k].tolist()
        samples = anchors + [seg.buffer[i] for i in idx]
        train_steps(
            seg.learner,
            self.backbone,
            seg.optimizer,
            samples,
            self.online_steps,
            self._gen,
            batch=len(samples),
            patience=10**6,
        )

    # ---------------------------------------------------------------- learner files
    def save_learner(self, path: str | Path) -> None:
        """A learner file: tensors in .npz plus JSON metadata (no pickle)."""
        path = Path(path)
        arrays = {}
        for v, seg in self._segments.items():
            for k, t in seg.learner.state_dict().items():
                arrays[f"seg{v}.{k}"] = t.detach().cpu().numpy()
        meta = {
            "format": LEARNER_FORMAT,
            "backbone": self.backbone_name,
            "weights": self.backbone.weights,
            "image_size": self.backbone.input_size,
            "segments": sorted(self._segments),
            "window": list(self.window) if self.window else None,
        }
        arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        tmp.replace(path)

    def load_learner_state(self, path: str | Path) -> dict:
        try:
            data = np.load(path, allow_pickle=False)
            meta = json.loads(bytes(data["__meta__"]).decode())
        except Exception as exc:  # noqa: BLE001
            raise InputError(
                f"{path} is not an oflsam2 learner file ({type(exc).__name__})"
            ) from None
        if meta.get("format") != LEARNER_FORMAT:
            raise InputError(
                f"{path} is not an oflsam2 learner file (format {meta.get('format')!r})"
            )
        for v in meta["segments"]:
            learner = Learner(self.backbone.embed_shape[0])
            sd = {
                k.split(".", 1)[1]: torch.from_numpy(data[k])
                for k in data.files
                if k.startswith(f"seg{v}.")
            }
            learner.load_state_dict(sd, strict=True)
            learner.to(self.backbone.device).eval()
            self._segments[v] = _Segment(
                v, learner, torch.optim.Adam(learner.parameters(), lr=1e-3)
            )
        return meta


def _sample(f, p, hires, target, box) -> Sample:
    """A training slice as the buffers keep it: float16 on the CPU."""
    return Sample(
        f[0].to("cpu", torch.float16),
        p[0].to("cpu", torch.float16),
        [h[0].to("cpu", torch.float16) for h in hires],
        target,
        box.cpu() if box is not None else None,
    )


def _confidence(logits: torch.Tensor, iou: torch.Tensor, random_weights: bool) -> float:
    """Mask certainty near the predicted boundary, times the predicted IoU where it means something."""
    p = torch.sigmoid(logits.float())
    fg = p > 0.5
    if not fg.any():
        return 0.0
    band = F.max_pool2d(fg[None, None].float(), 7, stride=1, padding=3)[0, 0] > 0
    certainty = float((2 * p[band] - 1).abs().mean())
    if random_weights:
        return certainty
    return float(np.sqrt(max(certainty, 0.0) * float(torch.clamp(iou, 0, 1))))
