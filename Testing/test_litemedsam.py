"""LiteMedSAM backbone with its real weights: quality with a box, gradients, bad weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

slicerio = pytest.importorskip("slicerio")

from oflsam2.backbones.litemedsam import LiteMedSAMBackbone, resized_shape  # noqa: E402
from oflsam2.errors import WeightsError  # noqa: E402
from oflsam2.metrics import dice  # noqa: E402
from oflsam2.volume import apply_window, intensity_window, read_image, read_labels  # noqa: E402

RIGHT_LUNG = 5


@pytest.fixture(scope="module")
def backbone() -> LiteMedSAMBackbone:
    return LiteMedSAMBackbone(device="cpu")


@pytest.fixture(scope="module")
def lung_slice() -> tuple[np.ndarray, np.ndarray]:
    """The axial slice of the slicerio CT with the most right lung, windowed, and its mask."""
    volume = read_image(slicerio.get_testdata_file("CTChest4.nrrd"))
    labels = read_labels(slicerio.get_testdata_file("Segmentation.seg.nrrd"), volume.geometry)
    mask = labels.array == RIGHT_LUNG
    k = int(np.argmax(mask.sum(axis=(1, 2))))
    window = intensity_window(volume.array, None, mask)
    return apply_window(volume.array[k], window), mask[k]


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
    assert not backbone.has_memory and not backbone.random_weights
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
    assert dice(logits[0, 0].numpy() > 0, mask) > 0.9


def test_decode_is_differentiable_in_the_embedding(backbone, lung_slice, lung_embed):
    _, mask = lung_slice
    embed = lung_embed.clone().requires_grad_(True)
    prompt = torch.zeros(2, 1, 256, 256)
    out = backbone.decode(embed.expand(2, -1, -1, -1), [], boxes=None, mask_prompt=prompt)
    target = F.interpolate(torch.from_numpy(mask).float()[None, None], size=(256, 256)).expand(
        2, -1, -1, -1
    )
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
