"""SAM2 / SAM2.1 from the installed ``sam2`` package, frozen, fed tensors directly.

Only SAM2's own modules are called (image encoder, memory attention, memory encoder,
prompt encoder, mask decoder); nothing goes through JPEG folders. The decoder is
called directly rather than through ``_forward_sam_heads``, which replaces masks by a
constant wherever the object score is not positive and so cuts every gradient.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, WeightsError
from .base import Backbone, Decoded, Encoded, pick_device

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class SAM2Backbone(Backbone):
    has_memory = True

    def __init__(
        self,
        model: str = "sam2.1_hiera_tiny",
        checkpoint: str | None = None,
        random_init: bool = False,
        device: str = "auto",
        image_size: int = 1024,
        encode_batch: int = 4,
        **_ignored,
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

    def no_memory_features(self, embed: torch.Tensor) -> torch.Tensor:
        """F plus SAM2's no-memory embedding: P for a slice with no memory yet."""
        return embed + self.net.no_mem_embed.view(1, -1, 1, 1)


def _load_strict(net: torch.nn.Module, path: str, name: str) -> None:
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
        first = str(exc).splitlines()[0][:160]
        raise WeightsError(
            f"checkpoint {path} does not fit {name} ({first}): pick the matching --model"
        ) from None
