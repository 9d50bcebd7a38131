"""Tests for the retrieval metrics: hand-computed answers and an exhaustive tie-order reference."""
import itertools
from math import comb

import numpy as np
import pytest

from rsalign_jax.evaluation.metrics import format_table, retrieval_metrics

KEYS = ["i2t_R1", "i2t_R5", "i2t_R10", "t2i_R1", "t2i_R5", "t2i_R10", "mR", "rsum", "i2t_meanr", "t2i_meanr"]


def _gt_matrix(caption_image, n_images):
    return (caption_image[None, :] == np.arange(n_images)[:, None]).astype(np.float32)


def test_perfect_retrieval_is_100_everywhere():
    caption_image = np.repeat(np.arange(4), 5)
    sim = _gt_matrix(caption_image, 4)
    for ties in ("expected", "optimistic", "pessimistic"):
        m = retrieval_metrics(sim, caption_image, ties=ties)
        assert list(m) == KEYS
        assert m == pytest.approx(dict.fromkeys(KEYS[:6] + ["mR"], 100.0) | {"rsum": 600.0, "i2t_meanr": 1.0, "t2i_meanr": 1.0})


def test_reversed_matrix_misses_at_rank_one():
    # GT scores are the lowest: each image has 15 captions above its GT ones, each caption 3 images above its own.
    caption_image = np.repeat(np.arange(4), 5)
    m = retrieval_metrics(-_gt_matrix(caption_image, 4), caption_image)
    expected = {"i2t_R1": 0, "i2t_R5": 0, "i2t_R10": 0, "t2i_R1": 0, "t2i_R5": 100, "t2i_R10": 100}
    assert m == pytest.approx(expected | {"mR": 200 / 6, "rsum": 200, "i2t_meanr": 16, "t2i_meanr": 4})


@pytest.mark.parametrize(
    "gt_scores, other_scores, p_hit, rank",
    [
        # g=0, t=3, m=1: P(hit@K) = 1 - C(3,K)/C(4,K); K=4 > t is a sure hit. E[rank] = 3/2.
        ([2, 1], [2, 2, 2, 0], [1 - 3 / 4, 1 - 3 / 6, 1 - 1 / 4, 1], 3 / 2),
        # g=1, t=2, m=2: K=1 <= g is a sure miss; K=2: 1 - C(2,1)/C(4,1); K=3: 1 - C(2,2)/C(4,2). E[rank] = 1 + 2/3.
        ([4, 4], [5, 4, 4, 0], [0, 1 - 2 / 4, 1 - 1 / 6, 1], 1 + 2 / 3),
    ],
)
def test_i2t_expected_hit_probability_by_hand(gt_scores, other_scores, p_hit, rank):
    # Image 0 owns captions 0-1 and carries the ties; image 1 owns captions 2-5 and is a sure hit.
    caption_image = np.array([0, 0, 1, 1, 1, 1])
    sim = np.array([gt_scores + other_scores, [0, 0, 9, 9, 9, 9]], np.float32)
    m = retrieval_metrics(sim, caption_image, ks=(1, 2, 3, 4))
    for k, p in zip((1, 2, 3, 4), p_hit):
        assert m[f"i2t_R{k}"] == pytest.approx(100 * (p + 1) / 2)
        assert m[f"t2i_R{k}"] == 100
    assert m["i2t_meanr"] == pytest.approx((rank + 1 + 1) / 2)


def test_closed_form_matches_binomials_for_larger_ties():
    # One image with m=3 GT captions tied with t=7 non-GT captions and g=2 above; a second, sure-hit image.
    g, t, m, ks = 2, 7, 3, (1, 3, 5, 8, 9, 12)
    caption_image = np.array([0] * m + [1] * (g + t + 1))
    sim = np.array([[1.0] * m + [2.0] * g + [1.0] * t + [0.0], [0.0] * m + [5.0] * (g + t + 1)])
    metrics = retrieval_metrics(sim, caption_image, ks=ks)
    for k in ks:
        p = 0.0 if k <= g else 1 - comb(t, k - g) / comb(t + m, k - g)
        assert metrics[f"i2t_R{k}"] == pytest.approx(100 * (p + 1) / 2)


def test_t2i_ties_and_bounds():
    # Caption 1's column ties all 3 images (t=2, m=1): P(hit@K) = K/3. Captions 0 and 2 are sure hits.
    caption_image = np.array([0, 1, 2])
    sim = np.array([[1.0, 5.0, 0.0], [0.0, 5.0, 0.0], [0.0, 5.0, 1.0]])
    expected = retrieval_metrics(sim, caption_image, ks=(1, 2, 3))
    optimistic = retrieval_metrics(sim, caption_image, ks=(1, 2, 3), ties="optimistic")
    pessimistic = retrieval_metrics(sim, caption_image, ks=(1, 2, 3), ties="pessimistic")
    for k in (1, 2, 3):
        assert expected[f"t2i_R{k}"] == pytest.approx(100 * (2 + k / 3) / 3)
        assert optimistic[f"t2i_R{k}"] == 100
        assert pessimistic[f"t2i_R{k}"] == pytest.approx(100 * (2 + (k == 3)) / 3)
    assert (expected["t2i_meanr"], optimistic["t2i_meanr"], pessimistic["t2i_meanr"]) == pytest.approx((4 / 3, 1, 5 / 3))


def _brute_force(sim, caption_image, ks):
    """Ranks under EVERY tie-breaking order; per direction and K, the mean / best / worst R@K and mean ranks."""
    n_images, n_captions = sim.shape
    out = {rule: {} for rule in ("expected", "optimistic", "pessimistic")}
    for d, scores, gt in (
        ("i2t", sim, caption_image[None, :] == np.arange(n_images)[:, None]),
        ("t2i", sim.T, np.arange(n_images)[None, :] == caption_image[:, None]),
    ):
        n = scores.shape[1]
        prio = np.array(list(itertools.permutations(range(n))))  # (orders, n) tie-break priority
        a, b = scores[:, None, :, None], scores[:, None, None, :]
        ahead = (a > b) | ((a == b) & (prio[None, :, :, None] < prio[None, :, None, :]))  # a placed before b
        position = ahead.sum(axis=2)  # (queries, orders, n) 0-based
        rank = np.where(gt[:, None, :], position, n).min(axis=2)  # best GT item, (queries, orders)
        for k in ks:
            hit = rank < k
            out["expected"][f"{d}_R{k}"] = 100 * hit.mean(1).mean()
            out["optimistic"][f"{d}_R{k}"] = 100 * hit.max(1).mean()
            out["pessimistic"][f"{d}_R{k}"] = 100 * hit.min(1).mean()
        out["expected"][f"{d}_meanr"] = rank.mean(1).mean() + 1
        out["optimistic"][f"{d}_meanr"] = rank.min(1).mean() + 1
        out["pessimistic"][f"{d}_meanr"] = rank.max(1).mean() + 1
    return out


@pytest.mark.parametrize("shape", [(3, 7), (4, 6), (5, 5)])
@pytest.mark.parametrize("seed", range(3))
def test_matches_exhaustive_tie_orders(shape, seed):
    rng = np.random.default_rng(seed)
    n_images, n_captions = shape
    caption_image = rng.permutation(np.concatenate([np.arange(n_images), rng.integers(0, n_images, n_captions - n_images)]))
    sim = rng.integers(0, 3, shape).astype(np.float32)  # three levels: ties everywhere
    ks = (1, 2, 3, 5)
    reference = _brute_force(sim, caption_image, ks)
    results = {}
    for ties, want in reference.items():
        results[ties] = retrieval_metrics(sim, caption_image, ks=ks, ties=ties, chunk_size=2)
        for key, value in want.items():
            assert results[ties][key] == pytest.approx(value, rel=1e-12, abs=1e-12), (ties, key)
    for key in reference["expected"]:
        lo, mid, hi = (results[t][key] for t in ("pessimistic", "expected", "optimistic"))
        if key.endswith("meanr"):
            lo, hi = hi, lo
        assert lo <= mid + 1e-9 and mid <= hi + 1e-9, key


def test_rs_shape_with_duplicate_captions():
    # Images 0 and 1 are both "dense residential": all 10 of their captions are one string, so their columns are
    # identical. Image 2 has its own captions; its last one scores 0.5 with every image.
    strings = ["dense residential area"] * 10 + ["a river", "a bridge", "green water", "a boat", "some scene"]
    column = {
        "dense residential area": [0.8, 0.6, 0.1],
        "a river": [0.2, 0.3, 0.9],
        "a bridge": [0.2, 0.3, 0.85],
        "green water": [0.2, 0.3, 0.7],
        "a boat": [0.2, 0.3, 0.7],
        "some scene": [0.5, 0.5, 0.5],
    }
    sim = np.array([column[s] for s in strings], np.float32).T
    caption_image = np.repeat(np.arange(3), 5)
    m = retrieval_metrics(sim, caption_image)
    # i2t: images 0 and 1 have g=0, t=5, m=5 -> P(hit@1) = 1 - 5/10, P(hit@5) = 1 - 1/C(10,5), sure at 10.
    # t2i: captions 5-9 have image 0 above (rank 1); caption 14 ties all 3 images (P(hit@1) = 1/3).
    hand = {
        "i2t_R1": 100 * (0.5 + 0.5 + 1) / 3,
        "i2t_R5": 100 * (2 * (1 - 1 / comb(10, 5)) + 1) / 3,
        "i2t_R10": 100.0,
        "t2i_R1": 100 * (5 + 0 + 4 + 1 / 3) / 15,
        "t2i_R5": 100.0,
        "t2i_R10": 100.0,
    }
    recalls = list(hand.values())
    hand |= {"mR": sum(recalls) / 6, "rsum": sum(recalls), "i2t_meanr": (2 * (1 + 5 / 6) + 1) / 3}
    hand["t2i_meanr"] = (5 * 1 + 5 * 2 + 4 * 1 + 2) / 15
    assert m == pytest.approx(hand)
    pessimistic = retrieval_metrics(sim, caption_image, ties="pessimistic")
    assert pessimistic["i2t_R1"] == pessimistic["i2t_R5"] == pytest.approx(100 / 3)


def test_variable_captions_per_image_unsorted():
    # 3 images owning 1, 2 and 4 captions, interleaved; no ties, so all tie rules agree.
    caption_image = np.array([2, 0, 2, 1, 2, 1, 2])
    sim = np.array(
        [
            [0.9, 0.5, 0.1, 0.2, 0.3, 0.4, 0.0],
            [0.1, 0.2, 0.3, 0.8, 0.4, 0.1, 0.9],
            [0.95, 0.9, 0.2, 0.1, 0.25, 0.0, 0.05],
        ]
    )
    # 0-based i2t ranks: 1, 1, 0. t2i ranks per caption: 0, 1, 1, 0, 2, 1, 1.
    hand = {"i2t_R1": 100 / 3, "i2t_R2": 100, "t2i_R1": 200 / 7, "t2i_R2": 600 / 7}
    hand |= {"mR": sum(hand.values()) / 4, "rsum": sum(hand.values()), "i2t_meanr": 5 / 3, "t2i_meanr": 13 / 7}
    for ties in ("expected", "optimistic", "pessimistic"):
        assert retrieval_metrics(sim, caption_image, ks=(1, 2), ties=ties) == pytest.approx(hand)


def test_no_ties_matches_argsort_protocol():
    """Continuous scores: every rule equals the reference's argsort ranking (METHODS §1.7), across chunk sizes."""
    rng = np.random.default_rng(0)
    n_images = 23
    caption_image = np.repeat(np.arange(n_images), 5)
    sim = rng.normal(size=(n_images, 5 * n_images))
    order_i2t = np.argsort(-sim, axis=1)
    rank_i2t = np.array([np.flatnonzero(caption_image[order_i2t[i]] == i).min() for i in range(n_images)])
    order_t2i = np.argsort(-sim, axis=0)
    rank_t2i = np.array([np.flatnonzero(order_t2i[:, j] == caption_image[j])[0] for j in range(5 * n_images)])
    for chunk_size in (None, 1, 4, 100):
        for ties in ("expected", "optimistic", "pessimistic"):
            m = retrieval_metrics(sim, caption_image, ties=ties, chunk_size=chunk_size)
            for k in (1, 5, 10):
                assert m[f"i2t_R{k}"] == pytest.approx(100 * np.mean(rank_i2t < k))
                assert m[f"t2i_R{k}"] == pytest.approx(100 * np.mean(rank_t2i < k))
            assert m["i2t_meanr"] == pytest.approx(rank_i2t.mean() + 1)
            assert m["t2i_meanr"] == pytest.approx(rank_t2i.mean() + 1)


def test_chunking_does_not_change_tied_results():
    rng = np.random.default_rng(1)
    caption_image = rng.permutation(np.arange(170) % 50)
    sim = rng.integers(0, 4, (50, 170)).astype(np.float32)
    whole = retrieval_metrics(sim, caption_image, chunk_size=50)
    for chunk_size in (1, 7, None):
        assert retrieval_metrics(sim, caption_image, chunk_size=chunk_size) == pytest.approx(whole, rel=1e-12)


@pytest.mark.parametrize(
    "sim, caption_image, kwargs, error, match",
    [
        (np.zeros(5), np.arange(5), {}, ValueError, r"2-D \(n_images, n_captions\).*shape \(5,\)"),
        (np.zeros((0, 3)), np.zeros(3, int), {}, ValueError, "non-empty"),
        (np.zeros((2, 4)), np.array([0, 1, 1]), {}, ValueError, r"shape \(n_captions,\) = \(4,\).*got \(3,\)"),
        (np.zeros((2, 4)), np.zeros((4, 1), int), {}, ValueError, r"got \(4, 1\)"),
        (np.zeros((2, 4)), np.array([0.0, 1.0, 1.0, 0.0]), {}, TypeError, "integer image indices"),
        (np.zeros((2, 4)), np.array([0, 1, 2, 1]), {}, ValueError, r"\[0, 2\); caption 2 points to image 2"),
        (np.zeros((2, 4)), np.array([0, -1, 1, 1]), {}, ValueError, "caption 1 points to image -1"),
        (np.zeros((3, 4)), np.array([0, 2, 2, 0]), {}, ValueError, "image 1 has no caption"),
        (np.array([[0.0, np.nan], [1.0, 0.0]]), np.array([0, 1]), {}, ValueError, "NaN"),
        (np.eye(2), np.array([0, 1]), {"ties": "random"}, ValueError, "ties must be one of"),
        (np.eye(2), np.array([0, 1]), {"ks": (0, 5)}, ValueError, "ks must be positive integers"),
    ],
)
def test_validation_errors(sim, caption_image, kwargs, error, match):
    with pytest.raises(error, match=match):
        retrieval_metrics(sim, caption_image, **kwargs)


def test_format_table():
    row = {"i2t_R1": 5.0, "i2t_R5": 20.0, "i2t_R10": 33.333, "t2i_R1": 4.0, "t2i_R5": 18.5, "t2i_R10": 30.0}
    row |= {"mR": 18.472, "rsum": 110.833, "i2t_meanr": 40.0, "t2i_meanr": 50.0}
    header = "| i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | mR | rsum |"
    values = "5.00 | 20.00 | 33.33 | 4.00 | 18.50 | 30.00 | 18.47 | 110.83 |"
    assert format_table(row) == "\n".join([header, "|---:|---:|---:|---:|---:|---:|---:|---:|", "| " + values])
    table = format_table({"random init": row, "trained": row}, title="RSICD test")
    assert table.splitlines() == [
        "**RSICD test**",
        "",
        "| model |" + header[1:],
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| random init | " + values,
        "| trained | " + values,
    ]
