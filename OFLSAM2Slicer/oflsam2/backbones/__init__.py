"""Frozen foundation models behind one small interface (see base.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Backbone, Decoded, Encoded, Prediction, Tracker, pick_device

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = [
    "Backbone",
    "Decoded",
    "Encoded",
    "Prediction",
    "Tracker",
    "build_backbone",
    "pick_device",
]


def build_backbone(settings: Settings) -> Backbone:
    """The frozen backbone ``settings.backbone`` names (``sam2`` or ``litemedsam``)."""
    if settings.backbone == "sam2":
        from .sam2 import SAM2Backbone

        return SAM2Backbone(
            model=settings.model,
            checkpoint=settings.checkpoint,
            random_init=settings.random_init,
            device=settings.device,
            image_size=settings.image_size,
        )
    from ..errors import InputError

    if settings.random_init:
        raise InputError(
            "--random-init applies to SAM2 only; LiteMedSAM always uses its bundled weights"
        )
    from .litemedsam import LiteMedSAMBackbone

    return LiteMedSAMBackbone(device=settings.device, checkpoint=settings.checkpoint)
