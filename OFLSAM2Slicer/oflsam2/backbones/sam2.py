"""SAM2 / SAM2.1 from the installed ``sam2`` package, frozen, fed tensors directly.

Only SAM2's own modules are called (image encoder, memory attention, memory encoder,
prompt encoder, mask decoder); nothing goes through JPEG folders. The decoder is
called directly rather than through ``_forward_sam_heads``, which replaces masks by a
constant wherever the object score is not positive and so cuts every gradient.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, WeightsError, first_line
from .base import Backbone, Decoded, Encoded, Prediction, SegmentView, Tracker, pick_device

if TYPE_CHECKING:
    from ..learner import Learner
    from ..settings import Settings

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class SAM2Backbone(Backbone):
    """SAM2's modules, frozen; its memory attention gives P (see :class:`SAM2Tracker`)."""

    def __init__(
        self,
        model: str = "sam2.1_hiera_tiny",
        checkpoint: str | None = None,
        random_init: bool = False,
        device: str = "auto",
        image_size: int = 1024,
        encode_batch: int | None = None,
    ) -> None:
        from .. import weights

        if image_size not in (256, 512, 1024) and image_size % 64:
            raise InputError(f"--image-size must be 512 or 1024, not {image_size}")
        entry = weights.REGISTRY.get(model)
        if entry is None or entry.family not in ("sam2", "sam2.1"):
            names = ", ".join(
                n for n, e in weights.REGISTRY.items() if e.family in ("sam2", "sam2.1")
            )
            raise InputError(f"unknown SAM2 model {model!r}: choose one of {names}")
        self.device = pick_device(device)
        self.random_weights = bool(random_init)
        path = None
        if not random_init:
            path = checkpoint or str(weights.resolve(model))
        try:
            from sam2.build_sam import build_sam2_video_predictor
        except ImportError as exc:  # pragma: no cover - environment problem
            raise InputError(
                "the sam2 package is not installed: run scripts/setup-env.sh "
                "(SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0)"
            ) from exc
        net = build_sam2_video_predictor(
            entry.config,
            None,
            device="cpu",
            hydra_overrides_extra=[f"++model.image_size={image_size}"],
            apply_postprocessing=False,
        )
        if path is not None:
            _load_strict(net, path, model)
        net.eval().to(self.device)
        for p in net.parameters():
            p.requires_grad_(False)
        self.net = net
        self.name = "sam2"
        self.model = model
        self.input_size = image_size
        h = image_size // 16
        self.embed_shape = (net.hidden_dim, h, h)
        self.mask_size = 4 * h
        if encode_batch is None:
            # On a CPU a batch of 4 at 1024 is no faster per slice than one slice (5.7 against
            # 5.0-5.4 s, 1 thread) but holds 1.3 GiB of activations against 0.5: one at a time.
            encode_batch = 1 if self.device.type == "cpu" and image_size > 512 else 4
        self.encode_batch = encode_batch
        self.weights = (
            "RANDOM WEIGHTS (speed and mechanics only)" if random_init else f"{model} ({path})"
        )
        self._pos: torch.Tensor | None = None  # stride-16 position encoding, same for all slices

    # ------------------------------------------------------------ images
    def prepare(self, slices01: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(slices01, dtype=np.float32))[:, None]
        s = self.input_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        x = x.expand(-1, 3, -1, -1)
        return ((x - _MEAN) / _STD).contiguous()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> Encoded:
        embeds, hi0, hi1 = [], [], []
        for start in range(0, images.shape[0], self.encode_batch):
            out = self.net.forward_image(images[start : start + self.encode_batch].to(self.device))
            fpn = out["backbone_fpn"]
            embeds.append(fpn[-1])
            hi0.append(fpn[0])
            hi1.append(fpn[1])
            if self._pos is None:
                self._pos = out["vision_pos_enc"][-1][:1].clone()
        return Encoded(torch.cat(embeds), [torch.cat(hi0), torch.cat(hi1)])

    # ------------------------------------------------------------ decoder
    def decode(
        self,
        embed: torch.Tensor,
        hires: list[torch.Tensor],
        boxes: torch.Tensor | None = None,
        mask_prompt: torch.Tensor | None = None,
    ) -> Decoded:
        """SAM2's prompt encoder + mask decoder; no prompt means SAM2's empty point."""
        net = self.net
        b = embed.shape[0]
        dev = embed.device
        coords = torch.zeros(b, 1, 2, device=dev)
        labels = -torch.ones(b, 1, dtype=torch.int32, device=dev)
        if boxes is not None:
            coords = boxes.reshape(b, 2, 2).to(dev, torch.float32)
            labels = torch.tensor([[2, 3]], dtype=torch.int32, device=dev).expand(b, 2)
        if (
            mask_prompt is not None
            and mask_prompt.shape[-2:] != net.sam_prompt_encoder.mask_input_size
        ):
            mask_prompt = F.interpolate(
                mask_prompt.float(),
                size=net.sam_prompt_encoder.mask_input_size,
                mode="bilinear",
                align_corners=False,
            )
        sparse, dense = net.sam_prompt_encoder(
            points=(coords, labels), boxes=None, masks=mask_prompt
        )
        multimask = boxes is None  # SAM2 tracks with multimask output when there is no click
        logits, ious, tokens, obj = net.sam_mask_decoder(
            image_embeddings=embed,
            image_pe=net.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            repeat_image=False,
            high_res_features=[h.to(embed.dtype) for h in hires],
        )
        if multimask:
            best = torch.argmax(ious, dim=-1)
            idx = torch.arange(b, device=dev)
            logits = logits[idx, best][:, None]
            iou = ious[idx, best]
            token = tokens[idx, best] if tokens.shape[1] > 1 else tokens[:, 0]
        else:
            iou = ious[:, 0]
            token = tokens[:, 0]
        return Decoded(logits.float(), iou.float(), obj[:, 0].float(), token)

    # ------------------------------------------------------------ memory
    def _flat(
        self, embed: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[int, int]]]:
        b, _, h, w = embed.shape
        pos = self._pos.to(embed.device).expand(b, -1, -1, -1)
        return [embed.flatten(2).permute(2, 0, 1)], [pos.flatten(2).permute(2, 0, 1)], [(h, w)]

    @torch.no_grad()
    def memory_features(
        self, embed: torch.Tensor, frame: int, bank: dict, num_frames: int, reverse: bool = False
    ) -> torch.Tensor:
        """SAM2's memory attention output (``pix_feat_with_mem``) for one slice.

        ``bank`` is SAM2's output dict ({"cond_frame_outputs": {...}, "non_cond_frame_outputs": {...}});
        with no conditioning frame it is SAM2's no-memory path.
        """
        feats, pos, sizes = self._flat(embed)
        init = len(bank["cond_frame_outputs"]) == 0
        return self.net._prepare_memory_conditioned_features(
            frame_idx=frame,
            is_init_cond_frame=init,
            current_vision_feats=feats,
            current_vision_pos_embeds=pos,
            feat_sizes=sizes,
            output_dict=bank,
            num_frames=num_frames,
            track_in_reverse=reverse,
        )

    @torch.no_grad()
    def memory_from_mask(
        self, embed: torch.Tensor, hires: list[torch.Tensor], mask: torch.Tensor
    ) -> dict:
        """Memory entry of an annotated slice: SAM2's mask-as-output path (``mask``: (B,1,S,S) in {0,1})."""
        net = self.net
        out = net._use_mask_as_output(embed, hires, mask.float())
        high_res, obj_ptr, obj = out[4], out[5], out[6]
        feats, _, sizes = self._flat(embed)
        mem, mem_pos = net._encode_new_memory(feats, sizes, high_res, obj, is_mask_from_pts=False)
        return {"maskmem_features": mem, "maskmem_pos_enc": mem_pos, "obj_ptr": obj_ptr}

    @torch.no_grad()
    def memory_from_prediction(self, embed: torch.Tensor, dec: Decoded) -> dict:
        """Memory entry of a predicted slice, as SAM2's tracking step writes it."""
        net = self.net
        obj = dec.object_score[:, None]
        appear = (obj > 0).float()
        low = torch.where(
            appear[:, :, None, None] > 0, dec.logits, torch.full_like(dec.logits, -1024.0)
        )
        high = F.interpolate(
            low, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False
        )
        ptr = net.obj_ptr_proj(dec.token)
        if net.pred_obj_scores:
            lam = torch.sigmoid(obj) if net.soft_no_obj_ptr else appear
            if net.fixed_no_obj_ptr:
                ptr = lam * ptr
            ptr = ptr + (1 - lam) * net.no_obj_ptr
        feats, _, sizes = self._flat(embed)
        mem, mem_pos = net._encode_new_memory(feats, sizes, high, obj, is_mask_from_pts=False)
        return {"maskmem_features": mem, "maskmem_pos_enc": mem_pos, "obj_ptr": ptr}

    # ------------------------------------------------------------ what the segmenter needs
    def default_fit_steps(self) -> int:
        # Measured on 2 idle CPU cores: a frozen decoder step on 4 slices takes ~0.12 s at 512
        # and ~0.6 s at 1024.
        if self.device.type != "cpu":
            return 150
        return 80 if self.input_size <= 512 else 45

    def bytes_per_slice(self) -> int:
        h = self.input_size // 16
        return (self.embed_shape[0] * h * h + 32 * (4 * h) ** 2 + 64 * (2 * h) ** 2) * 2

    def tracker(self, settings: Settings, view: SegmentView) -> SAM2Tracker:
        return SAM2Tracker(self, settings, view)


class SAM2Tracker(Tracker):
    """SAM2's tracking step on fused features: painted slices are conditioning frames,
    predictions enter a window of recent frames, P is SAM2's memory attention output."""

    backbone: SAM2Backbone

    def __init__(self, backbone: SAM2Backbone, settings: Settings, view: SegmentView) -> None:
        super().__init__(backbone, settings, view)
        self._cond: dict[int, dict] = {}  # painted slice -> its memory entry
        self._bank: dict = {}
        self._step = 1

    def condition(self) -> None:
        self._cond.clear()

    def _conditioned(self, exclude: int | None = None) -> dict:
        """SAM2's output dict holding the painted slices (their masks) as conditioning frames."""
        bank: dict = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        size = self.backbone.input_size
        for a in self.view.annotated:
            if a == exclude:
                continue
            if a not in self._cond:
                f, hires = self.view.features(a)
                mask = self.view.target(self.view.painted(a), size)[None]
                self._cond[a] = self.backbone.memory_from_mask(f, hires, (mask > 0.5).float())
            bank["cond_frame_outputs"][a] = self._cond[a]
        return bank

    def training_memory(self, t: int, f: torch.Tensor) -> torch.Tensor:
        return self.backbone.memory_features(f, t, self._conditioned(exclude=t), self.view.n_slices)

    def start(self, learner: Learner, start: int, step: int) -> None:
        self._bank, self._step = self._conditioned(), step

    def step(
        self,
        learner: Learner,
        t: int,
        f: torch.Tensor,
        hires: list[torch.Tensor],
        beyond: bool,
        previous: np.ndarray | None,
    ) -> Prediction:
        prompt = None
        if not beyond and (self.settings.prior or self.backbone.default_prior) == "interp":
            # Between painted slices the interpolated shape is a dense mask prompt.
            size = 4 * self.backbone.embed_shape[-1]
            prompt = self.view.prior(t, size).to(self.backbone.device)
        with torch.no_grad():
            p = self.backbone.memory_features(f, t, self._bank, self.view.n_slices, self._step < 0)
            fused, _ = learner(f, p)
            dec = self.backbone.decode(fused, hires, mask_prompt=prompt)
        # Random weights say "no object" everywhere: presence then comes from the mask alone.
        sure = self.backbone.random_weights or float(dec.object_score[0]) > 0
        return self._finish(dec, p, None, sure)

    def remember(self, t: int, f: torch.Tensor, prediction: Prediction) -> None:
        dec = prediction.decoded
        if dec is None:
            return
        if self.backbone.random_weights:
            dec.object_score = torch.full_like(
                dec.object_score, 1.0 if prediction.present else -1.0
            )
        recent = self._bank["non_cond_frame_outputs"]
        recent[t] = self.backbone.memory_from_prediction(f, dec)
        recent.pop(t - self._step * self.settings.memory_window, None)


def _load_strict(net: torch.nn.Module, path: str, name: str) -> None:
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise WeightsError(
            f"checkpoint {path} is empty (0 bytes): download it again with "
            f"`oflsam2 weights download {name}`"
        )
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(
            f"checkpoint {path} does not exist: run `oflsam2 weights download {name}`"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise WeightsError(
            f"checkpoint {path} cannot be loaded ({type(exc).__name__}): it is corrupt or not a SAM2 checkpoint; "
            f"download it again with `oflsam2 weights download {name}`"
        ) from None
    if isinstance(sd, dict) and "model" in sd:
        sd = sd["model"]
    try:
        net.load_state_dict(sd, strict=True)
    except (RuntimeError, TypeError) as exc:
        raise WeightsError(
            f"checkpoint {path} does not fit {name} ({first_line(exc)}): pick the matching --model"
        ) from None
