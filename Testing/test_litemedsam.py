"""LiteMedSAM backbone with its real weights: quality with a box, gradients, bad weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import RIGHT_LUNG_TRUE_BOX_FLOOR

from oflsam2.backbones.litemedsam import LiteMedSAMBackbone, resized_shape
from oflsam2.errors import WeightsError
from oflsam2.metrics import dice
from oflsam2.volume import apply_window, intensity_window

pytestmark = [pytest.mark.slow, pytest.mark.engine]


@pytest.fixture(scope="module")
def backbone() -> LiteMedSAMBackbone:
    return LiteMedSAMBackbone(device="cpu")


@pytest.fixture(scope="module")
def lung_slice(sample_ct, right_lung) -> tuple[np.ndarray, np.ndarray]:
    """The middle painted slice of the right lung, windowed, and its mask."""
    k = right_lung.slices[len(right_lung.slices) // 2]
    window = intensity_window(sample_ct.array, None, right_lung.truth)
    return apply_window(sample_ct.array[k], window), right_lung.truth[k]


@pytest.fixture(scope="module")
def lung_embed(backbone, lung_slice) -> torch.Tensor:
    image, _ = lung_slice
    x = backbone.prepare(image[None])
    assert tuple(x.shape) == (1, 3, 256, 256)
    enc = backbone.encode(x)
    assert tuple(enc.embed.shape) == (1, 256, 64, 64) and enc.hires == []
    return enc.embed


def test_attributes_and_frozen(backbone):
    assert backbone.name == "litemedsam"
    assert (backbone.input_size, backbone.embed_shape, backbone.mask_size) == (
        256,
        (256, 64, 64),
        256,
    )
    assert not backbone.random_weights
    assert backbone.decoder_every > 1 and backbone.default_prior == "interp"  # box-prompted family
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert not backbone.model.training


def test_ground_truth_box_segments_the_lung(backbone, lung_slice, lung_embed):
    _, mask = lung_slice
    ys, xs = np.nonzero(mask)
    s = 256 / mask.shape[0]
    box = torch.tensor([[xs.min() * s, ys.min() * s, (xs.max() + 1) * s, (ys.max() + 1) * s]])
    out = backbone.decode(lung_embed, [], boxes=box)
    assert tuple(out.logits.shape) == (1, 1, 256, 256)
    assert out.iou.shape == (1,) and out.object_score.shape == (1,) and out.token is None
    assert float(out.object_score[0]) > 0
    logits = F.interpolate(out.logits, size=mask.shape, mode="bilinear", align_corners=False)
    assert dice(logits[0, 0].numpy() > 0, mask) > RIGHT_LUNG_TRUE_BOX_FLOOR


def test_decode_is_differentiable_in_the_embedding(backbone, lung_slice, lung_embed):
    _, mask = lung_slice
    embed = lung_embed.clone().requires_grad_(True)
    prompt = torch.zeros(2, 1, 256, 256)
    out = backbone.decode(embed.expand(2, -1, -1, -1), [], boxes=None, mask_prompt=prompt)
    target = F.interpolate(
        torch.tensor(mask, dtype=torch.float32)[None, None], size=(256, 256)
    ).expand(2, -1, -1, -1)
    F.binary_cross_entropy_with_logits(out.logits, target).backward()
    assert embed.grad is not None and float(embed.grad.abs().sum()) > 0


def test_non_square_slices_keep_aspect_and_pad(backbone):
    x = backbone.prepare(np.ones((3, 64, 128), np.float32))
    assert tuple(x.shape) == (3, 3, 256, 256)
    assert resized_shape(64, 128) == (128, 256)
    assert float(x[:, :, :128].min()) == 1.0 and float(x[:, :, 128:].max()) == 0.0


def test_bad_checkpoint_is_a_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        LiteMedSAMBackbone(device="cpu", checkpoint=tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="corrupt"):
        LiteMedSAMBackbone(device="cpu", checkpoint=bad)
