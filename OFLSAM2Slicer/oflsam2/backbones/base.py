"""The interface every frozen backbone offers the learner and the propagation."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InputError


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
    """A frozen promptable segmentation model.

    ``prepare`` turns windowed square slices in [0, 1] into model input, ``encode``
    gives features (no gradient), ``decode`` runs the frozen prompt encoder and mask
    decoder on a (possibly learned) embedding and is differentiable in that embedding.
    """

    name: str = "?"
    input_size: int = 0  # square input side in pixels
    embed_shape: tuple[int, int, int] = (256, 0, 0)  # (C, h, w)
    mask_size: int = 0  # side of the low-resolution logits
    has_memory: bool = False
    random_weights: bool = False
    weights: str = ""  # what was loaded, for reports
    device: torch.device = torch.device("cpu")

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
        raise NotImplementedError


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
