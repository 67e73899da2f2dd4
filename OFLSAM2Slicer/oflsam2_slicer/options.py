"""The panel's choices and what a propagation is asked to do.

Every engine default comes from :data:`oflsam2.settings.DEFAULTS`; this module only adds
the choices the panel offers and the two settings the engine does not have (slice axis and
slice range, which the glue handles itself).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import Any

from oflsam2.settings import DEFAULTS, Settings

# ---------------------------------------------------------------- choices shown in the panel


class Model(enum.Enum):
    """Backbone and weights, as offered in the panel's model list."""

    SAM21_TINY = "sam2.1_hiera_tiny"
    SAM21_SMALL = "sam2.1_hiera_small"
    SAM21_BASE_PLUS = "sam2.1_hiera_base_plus"
    SAM21_LARGE = "sam2.1_hiera_large"
    LITEMEDSAM = "litemedsam"

    def label(self) -> str:
        """Text in the combo box (the parameter node GUI connector calls this)."""
        return _MODEL_LABELS[self.name]

    @property
    def backbone(self) -> str:
        return "litemedsam" if self is Model.LITEMEDSAM else "sam2"

    @property
    def weightsName(self) -> str:
        """Name of the weights in ``oflsam2.weights``' registry."""
        return self.value

    def applyTo(self, settings: Settings) -> Settings:
        """``settings`` with this backbone (and, for SAM2, these weights)."""
        if self is Model.LITEMEDSAM:
            return settings.replace(backbone=self.backbone)
        return settings.replace(backbone=self.backbone, model=self.value)

    @classmethod
    def of(cls, settings: Settings) -> Model:
        """The panel's entry for ``settings``' backbone and weights."""
        return cls.LITEMEDSAM if settings.backbone == "litemedsam" else cls(settings.model)

    @classmethod
    def default(cls) -> Model:
        return cls.of(DEFAULTS)


_MODEL_LABELS = {
    "SAM21_TINY": "SAM2.1 tiny",
    "SAM21_SMALL": "SAM2.1 small",
    "SAM21_BASE_PLUS": "SAM2.1 base+",
    "SAM21_LARGE": "SAM2.1 large",
    "LITEMEDSAM": "LiteMedSAM (offline)",
}


class Quality(enum.Enum):
    """SAM2 input size: 512 is about four times faster than 1024 (LiteMedSAM always uses 256)."""

    FULL = 1024
    FAST = 512

    def label(self) -> str:
        return "Full (1024)" if self is Quality.FULL else "Fast (512)"

    @classmethod
    def default(cls) -> Quality:
        return cls(DEFAULTS.image_size)


class Device(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self) -> str:
        return {"AUTO": "Automatic", "CPU": "CPU", "CUDA": "CUDA GPU"}[self.name]

    @classmethod
    def default(cls) -> Device:
        return cls(DEFAULTS.device)


class SliceAxis(enum.Enum):
    """Orientation of the painted slices; AUTO picks the one with the fewest painted slices."""

    AUTO = "auto"
    AXIAL = "axial"
    CORONAL = "coronal"
    SAGITTAL = "sagittal"

    def label(self) -> str:
        return self.value.capitalize() if self is not SliceAxis.AUTO else "Automatic"


# ---------------------------------------------------------------- what to propagate


@dataclass(frozen=True)
class PropagationOptions:
    """The engine's :class:`Settings` plus where to propagate, which only the glue handles."""

    settings: Settings = DEFAULTS
    axis: str | int = "auto"  # auto, axial, coronal, sagittal, or an array axis 0/1/2 (k, j, i)
    slice_range: tuple[int, int] | None = None  # first and last slice along the axis, inclusive

    def __post_init__(self) -> None:
        if self.slice_range is not None:
            first, last = self.slice_range
            object.__setattr__(self, "slice_range", (int(first), int(last)))

    @classmethod
    def build(cls, settings: Settings = DEFAULTS, **changes: Any) -> PropagationOptions:
        """Options from ``settings`` with ``changes``: ``axis``, ``slice_range`` and any
        ``Settings`` field (backbone, model, image_size, device, online, gamma, fit_steps, ...)."""
        own = {f.name: changes.pop(f.name) for f in fields(cls) if f.name in changes}
        return cls(settings=settings.replace(**changes), **own)

    @classmethod
    def fromChoices(
        cls,
        model: Model | None = None,
        quality: Quality | None = None,
        device: Device | None = None,
        online: bool = DEFAULTS.online,
        gamma: float = DEFAULTS.gamma,
        fitSteps: int = 0,
        sliceAxis: SliceAxis = SliceAxis.AUTO,
        sliceRange: tuple[int, int] | None = None,
    ) -> PropagationOptions:
        """Options from the panel's choices (``fitSteps`` 0 means the engine's default)."""
        return cls.build(
            settings=(model or Model.default()).applyTo(DEFAULTS),
            axis=sliceAxis.value,
            slice_range=sliceRange,
            image_size=(quality or Quality.default()).value,
            device=(device or Device.default()).value,
            online=bool(online),
            gamma=float(gamma),
            fit_steps=int(fitSteps) or DEFAULTS.fit_steps,
        )
