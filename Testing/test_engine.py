"""The OFL-SAM2 engine on SAM2 with random weights: mechanics, geometry, cache, cancel."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from oflsam2.errors import Cancelled, InputError
from oflsam2.metrics import dice
from oflsam2.progress import FIT, PROPAGATE, ProgressEvent
from oflsam2.segmenter import OFLSegmenter
from oflsam2.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.engine]  # builds SAM2 and fits learners: minutes

SIZE = 256  # smallest SAM2 input the configs allow; mechanics only
RANDOM_SAM2 = Settings(backbone="sam2", random_init=True, device="cpu", image_size=SIZE)


def ellipsoid(shape, centre, radii):
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    return (
        ((z - centre[0]) / radii[0]) ** 2
        + ((y - centre[1]) / radii[1]) ** 2
        + ((x - centre[2]) / radii[2]) ** 2
    ) < 1


@pytest.fixture(scope="module")
def synthetic():
    shape = (12, 64, 72)  # non-square slices on purpose
    a = ellipsoid(shape, (6, 30, 24), (4.6, 13, 12))
    b = ellipsoid(shape, (5, 34, 52), (3.6, 9, 10)) & ~a
    rng = np.random.default_rng(0)
    img = (rng.normal(0, 15, shape) + 250 * a + 500 * b).astype(np.float32)
    truth = np.zeros(shape, np.uint8)
    truth[a] = 1
    truth[b] = 2
    sparse = np.zeros(shape, np.uint8)
    for s in (3, 6, 8):
        sparse[s] = truth[s]
    return img, truth, sparse


@pytest.fixture(scope="module")
def run(synthetic):
    img, truth, sparse = synthetic
    seg = OFLSegmenter(RANDOM_SAM2.replace(fit_steps=60, seed=0))
    seg.set_volume(img)
    seg.fit(sparse)
    calls_after_fit = seg.encoder_calls
    stages = []
    result = seg.propagate(progress=stages.append)
    return seg, result, calls_after_fit, stages


def test_output_shape_and_annotated_slices_exact(synthetic, run):
    img, truth, sparse = synthetic
    seg, result, _, _ = run
    assert result.labels.shape == img.shape
    assert result.labels.dtype == np.uint8
    assert result.axis == 0
    assert result.annotated == [3, 6, 8]
    for s in (3, 6, 8):
        np.testing.assert_array_equal(result.labels[s], sparse[s])


def test_multi_segment_output_and_reasonable_overlap(synthetic, run):
    _, truth, _ = synthetic
    _, result, _, _ = run
    assert set(np.unique(result.labels)) == {0, 1, 2}
    # Random weights, but the learner is trained on this very volume: it must find both objects.
    assert dice(result.labels == 1, truth == 1) > 0.6
    assert dice(result.labels == 2, truth == 2) > 0.5
    assert set(result.predicted_slices) == {1, 2}
    assert result.voxels[1] == int(np.count_nonzero(result.labels == 1))
    between = [4, 5, 7]  # reached by both walks (painted 3, 6, 8)
    d = result.disagreement
    assert np.all((d[between] >= 0) & (d[between] <= 1))
    assert np.isnan(d[[0, 3, 6, 8]]).all()  # painted, or reached by one walk only


def test_each_slice_encoded_once_and_progress_reported(synthetic, run):
    seg, result, calls_after_fit, stages = run
    assert calls_after_fit == 3  # fitting needs only the annotated slices
    assert seg.encoder_calls == len(seg.cached_slices) <= synthetic[0].shape[0]
    assert all(isinstance(e, ProgressEvent) for e in stages)
    assert {e.segment for e in stages if e.stage == PROPAGATE} == {1, 2}
    assert FIT not in {e.stage for e in stages}  # propagate() does not fit
    done = [e.done for e in stages if e.stage == PROPAGATE and e.segment == 1]
    assert done == sorted(done) and done[-1] <= stages[-1].total


def test_learner_loss_falls(run):
    seg, result, _, _ = run
    losses = result.losses[1]
    assert losses[-1] < 0.8 * losses[0]


@pytest.fixture
def fresh(synthetic):
    """A segmenter of its own (fit briefly) for tests that refit: the module's run stays as it was."""
    img, _, sparse = synthetic
    seg = OFLSegmenter(RANDOM_SAM2.replace(fit_steps=5, online=False))
    seg.set_volume(img)
    seg.fit(sparse)
    return seg


def test_repropagation_reuses_cache_and_keeps_new_slice(synthetic, fresh):
    img, truth, sparse = synthetic
    seg = fresh
    seg.propagate()
    before = seg.encoder_calls
    sparse2 = sparse.copy()
    sparse2[5] = truth[5]
    seg.set_volume(img)  # the same array: cache kept
    seg.fit(sparse2)
    second = seg.propagate()
    assert seg.encoder_calls == len(seg.cached_slices)  # no slice encoded twice
    assert second.encoded_slices == seg.encoder_calls - before
    assert second.encoded_slices <= img.shape[0] - before
    np.testing.assert_array_equal(second.labels[5], truth[5])
    assert second.annotated == [3, 5, 6, 8]


def test_cancel_raises_and_returns_nothing(fresh):
    cancel = threading.Event()

    def progress(event: ProgressEvent) -> None:
        if event.stage == PROPAGATE and event.done >= 2:
            cancel.set()

    with pytest.raises(Cancelled):
        fresh.propagate(progress=progress, cancel=cancel)


def test_random_weights_object_score_does_not_cut_gradients_or_output():
    seg = OFLSegmenter(RANDOM_SAM2)
    bb = seg.backbone
    x = bb.prepare(np.random.default_rng(1).random((1, 40, 40), dtype=np.float32))
    enc = bb.encode(x)
    embed = enc.embed.clone().requires_grad_(True)
    dec = bb.decode(embed, enc.hires)
    assert dec.logits.shape == (1, 1, bb.mask_size, bb.mask_size)
    # SAM2's _forward_sam_heads would put -1024 here when the score is not positive; we never do.
    assert dec.logits.std() > 0
    dec.logits.sum().backward()
    assert embed.grad is not None and float(embed.grad.abs().sum()) > 0


def test_frozen_backbone_has_no_trainable_parameters():
    seg = OFLSegmenter(RANDOM_SAM2)
    assert not any(p.requires_grad for p in seg.backbone.net.parameters())
    from oflsam2.learner import Learner, count_parameters

    assert count_parameters(Learner()) < 400_000


def test_fusion_starts_close_to_sam2():
    from oflsam2.fusion import AdaptiveFusion

    fusion = AdaptiveFusion(8)
    t, p = torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        fused, gates = fusion(t, p)
    assert float(gates[:, 1].mean()) > 0.9 and float(gates[:, 0].mean()) < 0.1
    # T close to P at the start: the fused features are then close to P itself.
    with torch.no_grad():
        same, _ = fusion(p, p)
    assert torch.allclose(same, p, atol=1e-5)


def test_bad_inputs_are_input_errors(synthetic, monkeypatch):
    img, _, sparse = synthetic
    seg = OFLSegmenter(RANDOM_SAM2)
    with pytest.raises(InputError, match="3D"):
        seg.set_volume(img[0])
    seg.set_volume(img)
    with pytest.raises(InputError, match="empty"):
        seg.fit(np.zeros_like(sparse))
    with pytest.raises(InputError, match="shape"):
        seg.fit(sparse[:, :10])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="no CUDA GPU"):
        OFLSegmenter(RANDOM_SAM2.replace(device="cuda"))


def test_learner_file_round_trip_without_pickle(synthetic, tmp_path, run):
    seg = run[0]
    path = tmp_path / "learner.npz"
    seg.save_learner(path)
    data = np.load(path, allow_pickle=False)  # would fail on pickled objects
    assert "meta.json" in data.files
    other = OFLSegmenter(RANDOM_SAM2)
    other.set_volume(synthetic[0])
    meta = other.load_learner_state(path)
    assert [s["value"] for s in meta["segments"]] == [1, 2]
    for v in (1, 2):
        a = seg.learner(v).state_dict()
        b = other.learner(v).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    (tmp_path / "bad.npz").write_bytes(b"not a learner")
    with pytest.raises(InputError, match="not an oflsam2 learner"):
        other.load_learner_state(tmp_path / "bad.npz")


def test_same_seed_gives_identical_output_and_leaves_the_global_rng_alone(synthetic):
    img, _, sparse = synthetic
    quick = RANDOM_SAM2.replace(fit_steps=3, seed=7)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    outputs = []
    for _ in range(2):
        seg = OFLSegmenter(quick)  # random-init SAM2: its weights come from the seed too
        seg.set_volume(img)
        seg.fit(sparse)
        outputs.append(seg.propagate().labels)
    assert torch.equal(torch.get_rng_state(), before)  # the host's RNG was not touched
    np.testing.assert_array_equal(outputs[0], outputs[1])
    other = OFLSegmenter(quick.replace(seed=8))
    first = next(OFLSegmenter(quick).backbone.net.parameters())
    assert not torch.equal(first, next(other.backbone.net.parameters()))


def test_features_spilled_to_disk_give_the_same_result(synthetic):
    """A RAM budget of one slice sends the rest of the cache to disk; nothing else changes."""
    img, _, sparse = synthetic
    quick = RANDOM_SAM2.replace(fit_steps=3, seed=7)
    runs = []
    for budget in (None, 0.0):
        seg = OFLSegmenter(quick.replace(cache_ram_gib=budget))
        seg.set_volume(img)
        seg.fit(sparse)
        runs.append((seg, seg.propagate()))
    (ram, a), (disk, b) = runs
    np.testing.assert_array_equal(a.labels, b.labels)
    per_slice = ram.backbone.bytes_per_slice()
    assert ram._cache.bytes_on_disk == 0
    assert disk._cache.bytes_in_ram == per_slice  # only the newest slice stays in RAM
    n = len(disk.cached_slices)  # each slice written once at most, all but one at least
    assert (n - 1) * per_slice <= disk._cache.bytes_on_disk <= n * per_slice
    assert disk.encoder_calls == ram.encoder_calls  # nothing encoded twice


def test_each_segment_has_its_own_painted_slices(synthetic):
    """A slice painted with segment 1 only says nothing about segment 2 there."""
    img, truth, _ = synthetic
    sparse = np.zeros_like(truth)
    for s in (3, 7):
        sparse[s][truth[s] == 2] = 2
    for s in (3, 5, 7):
        sparse[s][truth[s] == 1] = 1
    seg = OFLSegmenter(RANDOM_SAM2.replace(fit_steps=3, online=False))
    seg.set_volume(img)
    seg.fit(sparse)
    result = seg.propagate()
    assert 5 in result.predicted_slices[2]  # slice 5 is not annotated for segment 2
    assert 5 not in result.predicted_slices[1]
    np.testing.assert_array_equal(result.labels[5][sparse[5] == 1], 1)  # paint kept
    explicit = OFLSegmenter(RANDOM_SAM2.replace(fit_steps=3, online=False))
    explicit.set_volume(img)
    explicit.fit(sparse, slices=[3, 5, 7])  # named slices: fully annotated, 0 = absent
    named = explicit.propagate()
    assert 5 not in named.predicted_slices[2]
    np.testing.assert_array_equal(named.labels[5], sparse[5])


def test_sam2_takes_the_interpolated_shape_as_its_dense_prompt_between_painted_slices(
    synthetic, fresh, monkeypatch
):
    """--prior interp: every slice between painted ones is decoded with the interpolated shape as
    SAM2's mask prompt (mechanics; random weights say nothing of quality)."""
    img, _, sparse = synthetic
    seg = fresh
    seg.reset(seg.settings.replace(prior="interp"))
    seg.fit(sparse)
    prompts: dict[int, torch.Tensor | None] = {}
    tracker = seg._segments[1].tracker
    original = tracker.step

    def spy(learner, t, f, hires, beyond, previous):
        calls = []
        decode = seg.backbone.decode

        def record(*args, **kwargs):
            calls.append(kwargs.get("mask_prompt"))
            return decode(*args, **kwargs)

        monkeypatch.setattr(seg.backbone, "decode", record)
        try:
            return original(learner, t, f, hires, beyond, previous)
        finally:
            monkeypatch.setattr(seg.backbone, "decode", decode)
            prompts[t] = calls[0]

    monkeypatch.setattr(tracker, "step", spy)
    seg.propagate()
    inside = [t for t in prompts if 3 < t < 8 and t != 6]
    assert sorted(inside) == [4, 5, 7]
    side = 4 * seg.backbone.embed_shape[-1]
    for t in inside:
        prompt = prompts[t]
        assert prompt is not None and tuple(prompt.shape) == (1, 1, side, side)
        # Positive where the interpolated shape is, negative far from it.
        assert float(prompt.max()) == 10.0 and float(prompt.min()) == -10.0
    assert all(prompts[t] is None for t in prompts if t < 3 or t > 8)


def test_retune_propagates_as_a_refit_would_and_refuses_fit_changes(synthetic):
    img, _, sparse = synthetic
    base = RANDOM_SAM2.replace(fit_steps=5, online=False)
    other = base.replace(extend=False, stop_after=1)
    seg = OFLSegmenter(base)
    seg.set_volume(img)
    seg.fit(sparse)
    seg.propagate()
    seg.retune(other)
    retuned = seg.propagate()
    fresh = OFLSegmenter(other)
    fresh.set_volume(img)
    fresh.fit(sparse)
    np.testing.assert_array_equal(retuned.labels, fresh.propagate().labels)
    with pytest.raises(ValueError, match="refit"):
        seg.retune(other.replace(learning_rate=1e-2))
    with pytest.raises(ValueError, match="online"):
        seg.retune(other.replace(online=True))
