"""The interface every frozen backbone offers the learner and the propagation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError

if TYPE_CHECKING:
    from ..learner import Learner
    from ..settings import Settings


@dataclass
class Encoded:
    """Image features of N slices."""

    embed: torch.Tensor  # (N, C, h, w) stride-16 embedding
    hires: list[torch.Tensor] = field(
        default_factory=list
    )  # extra decoder inputs (SAM2), may be empty


@dataclass
class Decoded:
    """Mask decoder output for N slices (one mask each)."""

    logits: torch.Tensor  # (N, 1, L, L) low-resolution mask logits
    iou: torch.Tensor  # (N,) predicted IoU
    object_score: torch.Tensor  # (N,) object-present logit (constant where the model has none)
    token: torch.Tensor | None = None  # (N, C) output token (SAM2 object pointer input)


class Backbone:
    """A frozen promptable segmentation model and what the segmenter needs to know of it.

    ``prepare`` turns windowed square slices in [0, 1] into model input, ``encode``
    gives features (no gradient), ``decode`` runs the frozen prompt encoder and mask
    decoder on a (possibly learned) embedding and is differentiable in that embedding.
    ``tracker`` gives the family's per-slice propagation step.
    """

    name: str = "?"
    input_size: int = 0  # square input side in pixels
    embed_shape: tuple[int, int, int] = (256, 0, 0)  # (C, h, w)
    mask_size: int = 0  # side of the low-resolution logits
    random_weights: bool = False
    weights: str = ""  # what was loaded, for reports
    device: torch.device = torch.device("cpu")
    encode_batch: int = 4  # slices per encoder call
    decoder_every: int = 1  # fit: every n-th step goes through the decoder (others: coarse head)
    default_prior: str = "none"  # prior between painted slices where it was measured to win

    def default_fit_steps(self) -> int:
        """Fit steps that keep fitting to seconds on this device."""
        raise NotImplementedError

    def bytes_per_slice(self) -> int:
        """Bytes one slice takes in the float16 feature cache."""
        raise NotImplementedError

    def tracker(self, settings: Settings, view: SegmentView) -> Tracker:
        raise NotImplementedError

    def prepare(self, slices01: np.ndarray) -> torch.Tensor:  # (N, H, W) -> (N, 3, S, S)
        raise NotImplementedError

    def encode(self, images: torch.Tensor) -> Encoded:
        raise NotImplementedError

    def decode(
        self,
        embed: torch.Tensor,
        hires: list[torch.Tensor],
        boxes: torch.Tensor | None = None,
        mask_prompt: torch.Tensor | None = None,
    ) -> Decoded:
        """``boxes`` (N, 4) xyxy input pixels; ``mask_prompt`` (N, 1, m, m) logits (dense prompt)."""
        raise NotImplementedError


@dataclass
class Prediction:
    """One propagated slice, as a tracker's ``step`` returns it."""

    logits: torch.Tensor  # (L, L) low-resolution logits on the CPU; all negative when absent
    confidence: float
    present: bool
    memory: torch.Tensor  # (1, C, h, w) P the slice was decoded with (kept for online samples)
    box: torch.Tensor | None = None  # the box prompt used, if any
    decoded: Decoded | None = None  # None when the step decided "absent" without decoding


class SegmentView(Protocol):
    """What a tracker may read about the volume and the one segment it follows."""

    value: int
    annotated: list[int]  # annotated slices along the slice axis (of any segment)
    n_slices: int

    def features(self, t: int) -> tuple[torch.Tensor, list[torch.Tensor]]: ...

    def painted(self, t: int) -> np.ndarray:  # the segment's mask on annotated slice t
        ...

    def target(self, mask2d: np.ndarray, size: int) -> torch.Tensor: ...

    def box(self, mask2d: np.ndarray) -> torch.Tensor | None: ...

    def interpolated(self, t: int) -> np.ndarray: ...

    def distance(self, t: int) -> np.ndarray:  # signed distance behind ``interpolated``
        ...
    def prior(self, t: int, size: int) -> torch.Tensor:  # ``interpolated`` as mask-prompt logits
        ...


class Tracker:
    """A backbone family's propagation step for one segment (cf. SAM2's ``track_step``).

    ``condition`` once per fit (the painted slices), then per walk ``start``; per slice
    ``step`` (memory read, learner, prompt, decode, presence) and ``remember`` (memory write).
    """

    def __init__(self, backbone: Backbone, settings: Settings, view: SegmentView) -> None:
        self.backbone = backbone
        self.settings = settings
        self.view = view

    def condition(self) -> None:
        """Take the painted slices of ``view`` as the walk's anchors (called after every fit)."""

    def training_memory(self, t: int, f: torch.Tensor) -> torch.Tensor:
        """P for painted slice ``t`` during fitting: memory of the *other* painted slices."""
        return f

    def training_box(self, mask2d: np.ndarray) -> tuple[bool, torch.Tensor | None]:
        """(use this painted slice for training?, its box prompt)."""
        return True, None

    def start(self, learner: Learner, start: int, step: int) -> None:
        """A walk from painted slice ``start`` in direction ``step`` (+1 / -1) begins."""

    def step(
        self,
        learner: Learner,
        t: int,
        f: torch.Tensor,
        hires: list[torch.Tensor],
        beyond: bool,
        previous: np.ndarray | None,
    ) -> Prediction:
        """Predict slice ``t`` (features ``f``, ``hires``); ``beyond``: outside the painted range;
        ``previous``: the full-slice mask of the slice walked before (painted or predicted)."""
        raise NotImplementedError

    def remember(self, t: int, f: torch.Tensor, prediction: Prediction) -> None:
        """Write a predicted slice into the walk's memory."""

    def _finish(
        self, dec: Decoded, p: torch.Tensor, box: torch.Tensor | None, object_present: bool = True
    ) -> Prediction:
        """Presence (any foreground, and the model's own object score) and confidence of a decode."""
        logits = dec.logits[0, 0].cpu()
        present = bool((logits > 0).any()) and object_present
        if not present:
            logits = torch.minimum(logits, torch.tensor(ABSENT_LOGIT))
        confidence = mask_confidence(logits, dec.iou[0], self.backbone.random_weights)
        return Prediction(logits, confidence, present, p, box, dec)


# Logits of an absent structure: a slice never decoded, and the ceiling of a decode judged absent.
NOT_DECODED_LOGIT = -20.0
ABSENT_LOGIT = -1.0


def mask_confidence(logits: torch.Tensor, iou: torch.Tensor, random_weights: bool) -> float:
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


def pick_device(device: str = "auto") -> torch.device:
    """auto: cuda, then mps, then cpu. Asking for a device that is absent is an input error."""
    device = (device or "auto").lower()
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if has_mps else torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError(
            "--device cuda was asked for but no CUDA GPU is available: use --device cpu or auto"
        )
    if device == "mps" and not has_mps:
        raise InputError(
            "--device mps was asked for but Apple MPS is not available: use --device cpu or auto"
        )
    if device not in ("cpu", "cuda", "mps"):
        raise InputError(f"unknown device {device!r}: use auto, cpu, cuda or mps")
    return torch.device(device)
