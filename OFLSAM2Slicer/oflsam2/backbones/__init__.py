"""Frozen foundation models behind one small interface (see base.py)."""

from .base import Backbone, Decoded, Encoded, pick_device

__all__ = ["Backbone", "Decoded", "Encoded", "pick_device", "build_backbone"]


def build_backbone(name: str, **kwargs) -> Backbone:
    """Build a frozen backbone by name: ``sam2`` or ``litemedsam``."""
    if name == "sam2":
        from .sam2 import SAM2Backbone

        return SAM2Backbone(**kwargs)
    if name == "litemedsam":
        from .litemedsam import LiteMedSAMBackbone

        return LiteMedSAMBackbone(**kwargs)
    from ..errors import InputError

    raise InputError(f"unknown backbone {name!r}: use sam2 or litemedsam")
