"""Retrieval metrics: a hand-computed example, multi-caption image→text, ties, and a brute-force cross-check."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.errors import BadInput
from retrieval.metrics import (
    precision_at_k,
    rank_of_first_relevant,
    recall_at_k,
    relevant_positions,
    retrieval_metrics,
)

# 3 images x 2 captions. With image_emb = identity, sim[text, image] = TEXTS[text, image] exactly.
TEXTS = np.array(
    [
        [0.9, 0.1, 0.2],  # t0 -> img0: rank 0
        [0.3, 0.8, 0.1],  # t1 -> img0: 0.8 beats it -> rank 1
        [0.5, 0.4, 0.6],  # t2 -> img1: 0.5 and 0.6 beat it -> rank 2
        [0.2, 0.7, 0.1],  # t3 -> img1: rank 0
        [0.1, 0.3, 0.5],  # t4 -> img2: rank 0
        [0.6, 0.2, 0.6],  # t5 -> img2: tied with img0 -> rank 0 (optimistic)
    ],
    dtype=np.float32,
)
T2I = np.array([0, 0, 1, 1, 2, 2])
IMAGES = np.eye(3, dtype=np.float32)


def test_hand_computed_text_to_image():
    m = retrieval_metrics(IMAGES, TEXTS, T2I, ks=(1, 2, 3))
    t = m["t2i"]
    # ranks (0-based) [0, 1, 2, 0, 0, 0]
    assert t["R@1"] == pytest.approx(100 * 4 / 6)
    assert t["R@2"] == pytest.approx(100 * 5 / 6)
    assert t["R@3"] == pytest.approx(100.0)
    assert t["P@1"] == pytest.approx(100 * 4 / 6)
    assert t["P@2"] == pytest.approx(100 * 5 / 6 / 2)
    assert t["P@3"] == pytest.approx(100 / 3)
    # one relevant item: F1 of a hit at K is 2 / (K + 1)
    assert t["F1@1"] == pytest.approx(100 * 4 / 6)
    assert t["F1@2"] == pytest.approx(100 * 5 / 6 * 2 / 3)
    assert t["F1@3"] == pytest.approx(50.0)
    assert t["mAP"] == pytest.approx(100 * (1 + 1 / 2 + 1 / 3 + 1 + 1 + 1) / 6)
    assert t["median_rank"] == 1.0
    assert t["mean_rank"] == pytest.approx(9 / 6)
    assert t["n_queries"] == 6
    assert m["n_images"] == 3 and m["n_texts"] == 6


def test_hand_computed_image_to_text_multi_caption():
    m = retrieval_metrics(IMAGES, TEXTS, T2I, ks=(1, 2, 3))
    i = m["i2t"]
    # img0 scores [.9 .3 .5 .2 .1 .6], relevant t0, t1 -> positions [0, 3]
    # img1 scores [.1 .8 .4 .7 .3 .2], relevant t2, t3 -> positions [1, 2]
    # img2 scores [.2 .1 .6 .1 .5 .6], relevant t4, t5 -> positions [0, 2] (t5 ties t2 at .6: optimistic)
    assert i["R@1"] == pytest.approx(100 * 2 / 3)
    assert i["R@2"] == pytest.approx(100.0)
    assert i["R@3"] == pytest.approx(100.0)
    assert i["P@1"] == pytest.approx(100 * 2 / 3)
    assert i["P@2"] == pytest.approx(50.0)
    assert i["P@3"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 2 / 3) / 3)
    # F1@1: img0 p=1 r=1/2 -> 2/3; img1 0; img2 2/3
    assert i["F1@1"] == pytest.approx(100 * 4 / 9)
    # F1@3: img0 p=1/3 r=1/2 -> 0.4; img1 p=2/3 r=1 -> 0.8; img2 0.8
    assert i["F1@3"] == pytest.approx(100 * 2.0 / 3)
    assert i["mAP"] == pytest.approx(100 * (0.75 + 7 / 12 + 5 / 6) / 3)
    assert i["median_rank"] == 1.0
    assert i["mean_rank"] == pytest.approx(4 / 3)
    assert i["n_queries"] == 3
    assert m["rsum"] == pytest.approx(sum(m[d][f"R@{k}"] for d in ("t2i", "i2t") for k in (1, 2, 3)))


def test_default_ks_and_keys():
    m = retrieval_metrics(IMAGES, TEXTS, T2I)
    for d in ("t2i", "i2t"):
        for k in (1, 5, 10):
            assert {f"R@{k}", f"P@{k}", f"F1@{k}"} <= m[d].keys()
        assert {"median_rank", "mean_rank"} <= m[d].keys()
    assert m["i2t"]["R@5"] == 100.0


def test_rank_of_first_relevant_forms():
    sim = TEXTS.T  # images as queries
    ranks = rank_of_first_relevant(sim, [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])])
    np.testing.assert_array_equal(ranks, [0, 1, 0])
    np.testing.assert_array_equal(rank_of_first_relevant(TEXTS, T2I), [0, 1, 2, 0, 0, 0])
    pos = relevant_positions(sim, [np.array([0, 1]), np.array([3]), np.array([4, 5])])
    assert pos[0].tolist() == [0, 3]
    assert pos[1, 0] == 1 and pos[1, 1] > 10**9  # t1 (0.8) beats t3 (0.7); one relevant item: padding
    assert precision_at_k(pos, 1) == pytest.approx(100 * 2 / 3)
    assert recall_at_k(np.array([0, 4, 9, 10]), 10) == pytest.approx(75.0)


def test_ties_are_optimistic_and_strict():
    sim = np.array([[0.5, 0.5, 0.5, 0.1]], dtype=np.float32)
    assert rank_of_first_relevant(sim, np.array([2]))[0] == 0
    # two relevant items tied with one non-relevant: both ahead of it
    pos = relevant_positions(sim, [np.array([0, 1])])
    assert pos.tolist() == [[0, 1]]


def test_bad_inputs():
    with pytest.raises(BadInput):
        retrieval_metrics(IMAGES, TEXTS[:, :2], T2I)
    with pytest.raises(BadInput):
        retrieval_metrics(IMAGES, TEXTS, np.array([0, 0, 1, 1, 2, 3]))
    with pytest.raises(BadInput):
        retrieval_metrics(IMAGES, TEXTS, T2I[:5])
    with pytest.raises(BadInput):
        rank_of_first_relevant(TEXTS, [np.array([0])] * 5 + [np.array([], dtype=np.int64)])


def _brute_force(image_emb, text_emb, t2i, k):
    """Reference: sort every query's candidates explicitly, relevant first among equal scores."""
    sim = text_emb @ image_emb.T

    def positions(scores, relevant):
        order = sorted(range(len(scores)), key=lambda c: (-scores[c], c not in relevant))
        return sorted(order.index(c) for c in relevant)

    t_pos = [positions(sim[t], {int(t2i[t])}) for t in range(len(t2i))]
    i_pos = [positions(sim[:, i], set(np.flatnonzero(t2i == i).tolist())) for i in range(len(image_emb))]
    i_pos = [p for p in i_pos if p]

    def summary(pos):
        return {
            "R": 100 * np.mean([p[0] < k for p in pos]),
            "P": 100 * np.mean([sum(x < k for x in p) / k for p in pos]),
            "median": float(np.median([p[0] + 1 for p in pos])),
            "mean": float(np.mean([p[0] + 1 for p in pos])),
        }

    return summary(t_pos), summary(i_pos)


@pytest.mark.parametrize("block_bytes", [1, 1 << 12, 128 << 20])
def test_matches_brute_force_with_variable_caption_counts(block_bytes):
    rng = np.random.default_rng(3)
    n_img, d = 40, 8
    counts = rng.integers(0, 6, size=n_img)  # 0..5 captions, some images with none
    t2i = np.repeat(np.arange(n_img), counts)
    rng.shuffle(t2i)
    img = rng.normal(size=(n_img, d)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = (img[t2i] + rng.normal(size=(len(t2i), d)) * 0.9).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    # dyadic values (multiples of 1/4): every dot product is exact in float32, and many scores tie
    img, txt = (np.round(img * 4) / 4).astype(np.float32), (np.round(txt * 4) / 4).astype(np.float32)
    m = retrieval_metrics(img, txt, t2i, ks=(1, 3, 5), block_bytes=block_bytes)
    assert m["i2t"]["n_queries"] == int((counts > 0).sum())
    for k in (1, 3, 5):
        ref_t, ref_i = _brute_force(img, txt, t2i, k)
        assert m["t2i"][f"R@{k}"] == pytest.approx(ref_t["R"])
        assert m["t2i"][f"P@{k}"] == pytest.approx(ref_t["P"])
        assert m["i2t"][f"R@{k}"] == pytest.approx(ref_i["R"])
        assert m["i2t"][f"P@{k}"] == pytest.approx(ref_i["P"])
    assert m["t2i"]["median_rank"] == pytest.approx(ref_t["median"])
    assert m["i2t"]["mean_rank"] == pytest.approx(ref_i["mean"])
    assert 0 < m["i2t"]["R@1"] < 100  # the example is neither trivial nor hopeless
