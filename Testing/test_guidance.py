"""The next slice to paint (oflsam2.guidance): the gap rule without signals, moved by them."""

from __future__ import annotations

import types

import numpy as np
import pytest

from oflsam2.guidance import rank_slices, suggest, uncertainty


def tube(n=21, radius=(6,) * 21, shape=(32, 32), value=1, axis=0) -> np.ndarray:
    """A label map holding a disc of the given radius on each slice along ``axis``."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros((n, *shape), np.uint8)
    for t in range(n):
        out[t][(yy - 16) ** 2 + (xx - 16) ** 2 <= radius[t] ** 2] = value
    return np.moveaxis(out, 0, axis)


def flat(n=21, value=0.8) -> np.ndarray:
    return np.full(n, value)


def test_without_signals_it_is_the_middle_of_the_largest_gap():
    ranked = rank_slices(tube(), 0, [5, 15], flat())
    assert ranked[0].slice == 10 and ranked[0].distance == 5
    assert {s.slice for s in ranked} == set(range(21)) - {5, 15}  # every unpainted slice
    assert all(0 < s.score <= 1 for s in ranked)
    assert [s.score for s in ranked] == sorted((s.score for s in ranked), reverse=True)


def test_disagreement_and_low_confidence_pull_the_suggestion():
    dis = np.full(21, np.nan)
    dis[6:15] = 0.05
    dis[7] = 0.9  # the walks from 5 and 15 disagree here
    assert rank_slices(tube(), 0, [5, 15], flat(), dis)[0].slice in (7, 8)
    conf = flat()
    conf[18] = 0.0  # the walk beyond slice 15 lost it here
    best = rank_slices(tube(), 0, [5, 15], conf)[0]
    assert best.slice in (17, 18, 19) and best.confidence in (0.8, 0.0)


def test_a_bigger_cross_section_wins_between_equal_gaps():
    radius = [2] * 10 + [10] * 11  # small on slices 0..9, big on 10..20
    ranked = rank_slices(tube(radius=radius), 0, [0, 10, 20], flat())
    assert 10 < ranked[0].slice < 20


def test_no_suggestion_outside_the_structure_or_on_painted_slices():
    labels = np.zeros((30, 32, 32), np.uint8)
    labels[5:26] = tube()
    conf = np.full(30, np.nan)
    conf[5:26] = 0.7
    ranked = rank_slices(labels, 0, [8, 22], conf)
    assert {s.slice for s in ranked} == set(range(5, 26)) - {8, 22}
    assert rank_slices(np.zeros((4, 8, 8), np.uint8), 0, [1], np.full(4, np.nan)) == []


def test_segments_add_up_and_any_axis_works():
    a = tube(value=1)
    both = a.copy()
    both[12:21, :6, :6] = 2  # a second segment beside the first, only on slices 12..20
    ranked = rank_slices(both, 0, [5, 15], flat())
    one = {s.slice: s.score for s in rank_slices(a, 0, [5, 15], flat())}
    assert {s.slice for s in ranked} == set(one)
    assert ranked[0].slice > 10  # the second segment's slices weigh in
    sideways = rank_slices(np.moveaxis(a, 0, 2), 2, [5, 15], flat())
    assert [s.slice for s in sideways] == [s.slice for s in rank_slices(a, 0, [5, 15], flat())]


def test_uncertainty_takes_the_more_pessimistic_signal():
    conf = np.array([0.9, 0.9, np.nan, 0.2])
    dis = np.array([np.nan, 0.5, np.nan, 0.1])
    np.testing.assert_allclose(uncertainty(conf, dis), [0.1, 0.5, 0.5, 0.8])
    np.testing.assert_allclose(uncertainty(conf, None), [0.1, 0.1, 0.5, 0.8])


def test_suggest_reads_an_engine_result():
    result = types.SimpleNamespace(
        labels=tube(), axis=0, annotated=[5, 15], confidence=flat(), disagreement=None
    )
    top = suggest(result)
    assert [s.slice for s in top][:1] == [10] and len(top) == 3
    d = top[0].as_dict()
    assert d == {
        "slice": 10,
        "score": pytest.approx(top[0].score, abs=1e-4),
        "confidence": 0.8,
        "disagreement": None,
        "distance": 5,
    }
