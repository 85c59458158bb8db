"""Tests for jaxmol.metrics on hand-built score matrices with known ranks."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxmol import metrics

# Three queries, four candidates. Gold ranks by hand: row 0 gold 0.9 is the best -> 1; row 1
# gold 0.6 is beaten by 0.8 and 0.7 -> 3; row 2 gold 0.1 is the worst -> 4.
HAND_SCORES = np.array(
    [
        [0.9, 0.1, 0.5, 0.3],
        [0.2, 0.8, 0.6, 0.7],
        [0.4, 0.3, 0.2, 0.1],
    ]
)
HAND_GOLD = np.array([0, 2, 3])
HAND_RANKS = np.array([1, 3, 4])


def test_known_ranks():
    np.testing.assert_array_equal(metrics.ranks_from_scores(HAND_SCORES, HAND_GOLD), HAND_RANKS)


def test_metric_values_by_hand():
    result = metrics.retrieval_metrics(HAND_SCORES, HAND_GOLD)
    assert result["hits@1"] == pytest.approx(1 / 3)
    assert result["hits@5"] == 1.0  # k beyond the pool of 4 counts every query
    assert result["hits@10"] == 1.0
    assert result["hits@20"] == 1.0
    assert result["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 4) / 3)  # = 19/36
    assert result["mean_rank"] == pytest.approx(8 / 3)
    assert result["median_rank"] == 3.0
    assert result["num_queries"] == 3
    assert result["pool_size"] == 4
    assert result["tie_policy"] == metrics.TIE_POLICY
    assert result["num_tied_queries"] == 0


def test_custom_ks_and_even_median():
    result = metrics.metrics_from_ranks(np.array([1, 2, 5, 8]), ks=(2, 5), pool_size=10)
    assert set(result) == {
        "hits@2",
        "hits@5",
        "mrr",
        "mean_rank",
        "median_rank",
        "num_queries",
        "pool_size",
        "num_tied_queries",
        "tie_policy",
        "optimistic",
        "pessimistic",
    }
    assert (
        set(result["optimistic"])
        == set(result["pessimistic"])
        == {
            "hits@2",
            "hits@5",
            "mrr",
            "mean_rank",
            "median_rank",
        }
    )
    # Plain ranks carry no tie counts: the dict says so instead of claiming "no ties".
    assert result["tie_policy"] == metrics.TIE_POLICY_RANKS_ONLY
    assert result["num_tied_queries"] == 0
    assert result["hits@2"] == 0.5
    assert result["hits@5"] == 0.75
    assert result["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 8) / 4)
    assert result["mean_rank"] == 4.0
    assert result["median_rank"] == 3.5
    json.dumps(result)  # metrics.json must be writable without conversion


def test_ranks_from_scores_are_optimistic():
    scores = np.array(
        [
            [0.5, 0.5, 0.5, 0.1],  # gold 1 ties with 0 and 2 -> rank 1
            [0.7, 0.5, 0.5, 0.9],  # gold 2: 0.7 and 0.9 beat it, the tie at 0.5 does not -> 3
            [0.3, 0.3, 0.3, 0.3],  # everything tied -> rank 1
        ]
    )
    np.testing.assert_array_equal(metrics.ranks_from_scores(scores, np.array([1, 2, 3])), [1, 3, 1])


# Four queries, five candidates, with ties worked out by hand. h = candidates strictly above
# the gold one, t = other candidates level with it; the gold rank is uniform on h+1..h+t+1.
TIED_SCORES = np.array(
    [
        [0.3, 0.3, 0.3, 0.3, 0.3],  # gold 3: all tied, h=0 t=4 -> ranks 1..5
        [0.5, 0.5, 0.5, 0.1, 0.0],  # gold 1: tied with 2 others at the top, h=0 t=2 -> 1..3
        [0.7, 0.5, 0.5, 0.9, 0.2],  # gold 2: tied with 1 in the middle, h=2 t=1 -> 3..4
        [0.1, 0.9, 0.3, 0.2, 0.0],  # gold 1: no tie, h=0 t=0 -> 1
    ]
)
TIED_GOLD = np.array([3, 1, 2, 1])
TIED_KS = (1, 2, 3, 5)


def test_rank_counts_by_hand():
    counts = metrics.rank_counts_from_scores(TIED_SCORES, TIED_GOLD)
    np.testing.assert_array_equal(counts.num_higher, [0, 0, 2, 0])
    np.testing.assert_array_equal(counts.num_tied, [4, 2, 1, 0])
    np.testing.assert_array_equal(counts.optimistic, [1, 1, 3, 1])
    np.testing.assert_array_equal(counts.pessimistic, [5, 3, 4, 1])
    np.testing.assert_array_equal(counts.expected, [3.0, 2.0, 3.5, 1.0])
    np.testing.assert_array_equal(metrics.ranks_from_scores(TIED_SCORES, TIED_GOLD), [1, 1, 3, 1])


def test_optimistic_and_pessimistic_bounds_by_hand():
    result = metrics.retrieval_metrics(TIED_SCORES, TIED_GOLD, ks=TIED_KS)
    assert result["num_tied_queries"] == 3
    assert result["tie_policy"] == metrics.TIE_POLICY
    # Optimistic ranks [1, 1, 3, 1].
    assert result["optimistic"] == pytest.approx(
        {
            "hits@1": 3 / 4,
            "hits@2": 3 / 4,
            "hits@3": 1.0,
            "hits@5": 1.0,
            "mrr": (1 + 1 + 1 / 3 + 1) / 4,
            "mean_rank": 6 / 4,
            "median_rank": 1.0,
        }
    )
    # Pessimistic ranks [5, 3, 4, 1].
    assert result["pessimistic"] == pytest.approx(
        {
            "hits@1": 1 / 4,
            "hits@2": 1 / 4,
            "hits@3": 2 / 4,
            "hits@5": 1.0,
            "mrr": (1 / 5 + 1 / 3 + 1 / 4 + 1) / 4,
            "mean_rank": 13 / 4,
            "median_rank": 3.5,
        }
    )


def test_expected_headline_by_hand():
    result = metrics.retrieval_metrics(TIED_SCORES, TIED_GOLD, ks=TIED_KS)
    # P(rank <= k) per query: row 0 k/5, row 1 min(k/3, 1), row 2 clip((k-2)/2), row 3 1.
    assert result["hits@1"] == pytest.approx((1 / 5 + 1 / 3 + 0 + 1) / 4)
    assert result["hits@2"] == pytest.approx((2 / 5 + 2 / 3 + 0 + 1) / 4)
    assert result["hits@3"] == pytest.approx((3 / 5 + 1 + 1 / 2 + 1) / 4)
    assert result["hits@5"] == 1.0
    # E[1/r] per query: the mean of 1/r over the possible ranks.
    rr = [
        (1 + 1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 5,  # = 137/300
        (1 + 1 / 2 + 1 / 3) / 3,  # = 11/18
        (1 / 3 + 1 / 4) / 2,  # = 7/24
        1.0,
    ]
    assert result["mrr"] == pytest.approx(sum(rr) / 4)
    assert result["mean_rank"] == pytest.approx((3 + 2 + 3.5 + 1) / 4)  # 1 + h + t/2
    assert result["median_rank"] == pytest.approx(2.5)  # median of 3, 2, 3.5, 1
    assert result["num_queries"] == 4
    assert result["pool_size"] == 5
    json.dumps(result)


def test_headline_lies_between_the_bounds():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, size=(40, 30))  # few distinct values: ties everywhere
    gold = rng.integers(0, 30, size=40)
    result = metrics.retrieval_metrics(scores, gold, ks=(1, 5, 10))
    assert result["num_tied_queries"] > 30
    for key in ("hits@1", "hits@5", "hits@10", "mrr"):
        assert result["pessimistic"][key] <= result[key] <= result["optimistic"][key], key
    assert result["optimistic"]["mean_rank"] < result["mean_rank"]
    assert result["mean_rank"] < result["pessimistic"]["mean_rank"]
    assert result["mean_rank"] == pytest.approx(
        (result["optimistic"]["mean_rank"] + result["pessimistic"]["mean_rank"]) / 2
    )


def test_integer_scores_with_ties_by_hand():
    scores = np.array([[2, 5, 2, 5, 2], [3, 1, 3, 3, 0]])
    # Row 0, gold 4: two 5s above, two 2s level -> h=2 t=2, ranks 3..5.
    # Row 1, gold 0: nothing above, two 3s level -> h=0 t=2, ranks 1..3.
    result = metrics.retrieval_metrics(scores, np.array([4, 0]), ks=(1, 3))
    assert result["num_tied_queries"] == 2
    assert result["hits@1"] == pytest.approx((0 + 1 / 3) / 2)
    assert result["hits@3"] == pytest.approx((1 / 3 + 1) / 2)
    assert result["mrr"] == pytest.approx(
        ((1 / 3 + 1 / 4 + 1 / 5) / 3 + (1 + 1 / 2 + 1 / 3) / 3) / 2
    )
    assert result["mean_rank"] == 3.0  # (4 + 2) / 2
    assert result["optimistic"]["mean_rank"] == 2.0  # ranks 3 and 1
    assert result["pessimistic"]["mean_rank"] == 4.0  # ranks 5 and 3
    assert result["optimistic"]["hits@1"] == 0.5
    assert result["pessimistic"]["hits@1"] == 0.0


def test_without_ties_all_three_policies_agree_exactly():
    rng = np.random.default_rng(4)
    scores = rng.normal(size=(60, 50))
    gold = rng.integers(0, 50, size=60)
    result = metrics.retrieval_metrics(scores, gold)
    assert result["num_tied_queries"] == 0
    for bound in ("optimistic", "pessimistic"):
        for key, value in result[bound].items():
            assert result[key] == value, (bound, key)  # exact, not approximate
    ranks = metrics.ranks_from_scores(scores, gold)
    plain = metrics.metrics_from_ranks(ranks, pool_size=50)
    for key in ("hits@1", "hits@5", "hits@10", "hits@20", "mrr", "mean_rank", "median_rank"):
        assert plain[key] == result[key], key


def test_metrics_from_rank_counts_pair():
    higher, tied = np.array([0, 0, 2, 0]), np.array([4, 2, 1, 0])
    from_pair = metrics.metrics_from_ranks((higher, tied), ks=TIED_KS, pool_size=5)
    from_scores = metrics.retrieval_metrics(TIED_SCORES, TIED_GOLD, ks=TIED_KS)
    assert from_pair == from_scores
    counts = metrics.RankCounts(higher, tied)
    assert metrics.metrics_from_ranks(counts, ks=TIED_KS, pool_size=5) == from_scores
    assert metrics.recall_at_k(counts, 2) == from_scores["hits@2"]


def test_expected_reciprocal_rank_deep_in_a_large_pool():
    # Harmonic-number differences at ranks near 33k must keep full precision.
    higher, tied = np.array([30_000, 12, 33_000]), np.array([5, 0, 8])
    result = metrics.metrics_from_ranks((higher, tied), ks=(1,), pool_size=33_009)
    direct = [
        sum(1 / r for r in range(30_001, 30_007)) / 6,
        1 / 13,
        sum(1 / r for r in range(33_001, 33_010)) / 9,
    ]
    assert result["mrr"] == pytest.approx(np.mean(direct), rel=1e-12)


@pytest.mark.parametrize(
    ("counts", "pool_size", "match"),
    [
        ((np.array([0, -1]), np.array([0, 0])), 5, "num_higher"),
        ((np.array([0, 1]), np.array([0, -2])), 5, "num_tied"),
        ((np.array([0, 1]), np.array([0, 1, 2])), 5, "shape"),
        ((np.array([0.0, 1.0]), np.array([0, 1])), 5, "integers"),
        ((np.array([3, 1]), np.array([2, 0])), 5, "pool_size"),  # rank up to 6 > 5
    ],
)
def test_rank_counts_validation(counts, pool_size, match):
    with pytest.raises(ValueError, match=match):
        metrics.metrics_from_ranks(counts, pool_size=pool_size)


def test_queries_sharing_a_gold_candidate():
    # Four texts describing two molecules: texts 0, 1 -> molecule 0, texts 2, 3 -> molecule 1.
    scores = np.array(
        [
            [0.9, 0.2],  # rank 1
            [0.1, 0.4],  # rank 2
            [0.3, 0.6],  # rank 1
            [0.8, 0.7],  # rank 2
        ]
    )
    gold = np.array([0, 0, 1, 1])
    np.testing.assert_array_equal(metrics.ranks_from_scores(scores, gold), [1, 2, 1, 2])
    result = metrics.retrieval_metrics(scores, gold, ks=(1,))
    assert result["hits@1"] == 0.5
    assert result["mrr"] == pytest.approx(0.75)
    assert result["pool_size"] == 2
    assert result["num_queries"] == 4


def test_integer_scores_are_accepted():
    scores = np.array([[3, 1, 3], [0, 2, 1]])
    np.testing.assert_array_equal(metrics.ranks_from_scores(scores, np.array([2, 2])), [1, 2])


def test_recall_at_k_is_hits_at_k():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 40))
    gold = rng.integers(0, 40, size=50)
    ranks = metrics.ranks_from_scores(scores, gold)
    result = metrics.retrieval_metrics(scores, gold)
    assert metrics.recall_at_k(ranks, 20) == result["hits@20"]
    assert metrics.recall_at_k(ranks, 5) == result["hits@5"]
    assert 0.0 < result["hits@20"] < 1.0  # the random case is not trivially 0 or 1


def test_nan_scores_raise():
    scores = HAND_SCORES.copy()
    scores[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        metrics.retrieval_metrics(scores, HAND_GOLD)
    with pytest.raises(ValueError, match="NaN"):
        metrics.ranks_from_scores(scores.astype(np.float32), HAND_GOLD)


def test_nan_in_a_non_gold_column_still_raises():
    scores = HAND_SCORES.copy()
    scores[0, 2] = np.nan  # gold of row 0 is column 0; a NaN must not be skipped silently
    with pytest.raises(ValueError, match="NaN"):
        metrics.ranks_from_scores(scores, HAND_GOLD)


def test_infinite_scores_are_ranked():
    scores = np.array([[np.inf, 1.0, -np.inf], [np.inf, np.inf, 0.0]])
    np.testing.assert_array_equal(metrics.ranks_from_scores(scores, np.array([2, 1])), [3, 1])


@pytest.mark.parametrize(
    ("gold", "match"),
    [
        (np.array([0, 2, 4]), r"\[0, 4\)"),
        (np.array([0, -1, 3]), r"\[0, 4\)"),
        (np.array([0, 2]), "shape"),
        (np.array([[0, 2, 3]]), "shape"),
        (np.array([0.0, 2.0, 3.0]), "integer"),
        (np.array([True, False, True]), "integer"),
    ],
)
def test_bad_gold_raises(gold, match):
    with pytest.raises(ValueError, match=match):
        metrics.retrieval_metrics(HAND_SCORES, gold)


@pytest.mark.parametrize(
    "scores",
    [np.zeros(4), np.zeros((2, 3, 4)), np.zeros((0, 4)), np.array([["a", "b"]]), np.zeros((3, 0))],
)
def test_bad_scores_raise(scores):
    gold = np.zeros(scores.shape[0] if scores.ndim else 0, dtype=int)
    with pytest.raises(ValueError):
        metrics.ranks_from_scores(scores, gold)


@pytest.mark.parametrize(
    ("ranks", "pool_size", "ks"),
    [
        (np.array([1, 0, 2]), 3, (1,)),  # rank 0 does not exist
        (np.array([1, 4]), 3, (1,)),  # rank beyond the pool
        (np.array([1.0, 2.0]), 3, (1,)),  # float ranks
        (np.array([], dtype=int), 3, (1,)),  # no queries
        (np.array([1, 2]), 3, (0,)),  # hits@0 is meaningless
        (np.array([1, 2]), 0, (1,)),  # empty pool
    ],
)
def test_metrics_from_ranks_validation(ranks, pool_size, ks):
    with pytest.raises(ValueError):
        metrics.metrics_from_ranks(ranks, ks=ks, pool_size=pool_size)


def _normalized_f32(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 10, 37, 4096])
def test_chunked_equals_unchunked(chunk_size):
    rng = np.random.default_rng(1)
    queries = rng.normal(size=(37, 16))
    candidates = rng.normal(size=(23, 16))
    # Duplicated candidates make exact ties with the gold one for some queries.
    candidates[5] = candidates[3]
    candidates[11] = candidates[3]
    gold = rng.integers(0, 23, size=37)
    gold[:6] = 3
    gold[6:9] = 11

    ranks = metrics.ranks_from_embeddings(queries, candidates, gold, chunk_size=chunk_size)
    one_chunk = metrics.ranks_from_embeddings(queries, candidates, gold, chunk_size=37)
    np.testing.assert_array_equal(ranks, one_chunk)

    full_scores = _normalized_f32(queries) @ _normalized_f32(candidates).T  # [Q, C]
    np.testing.assert_array_equal(ranks, metrics.ranks_from_scores(full_scores, gold))
    assert metrics.retrieval_metrics_from_embeddings(
        queries, candidates, gold, chunk_size=chunk_size
    ) == metrics.retrieval_metrics(full_scores, gold)
    # The duplicates of the gold candidate must not push it down.
    np.testing.assert_array_equal(ranks[:9], 1 + (full_scores[:9] > full_scores[:9, [3]]).sum(1))
    # ...but they are counted as ties, identically with and without chunks.
    counts = metrics.rank_counts_from_embeddings(queries, candidates, gold, chunk_size=chunk_size)
    reference = metrics.rank_counts_from_scores(full_scores, gold)
    np.testing.assert_array_equal(counts.num_higher, reference.num_higher)
    np.testing.assert_array_equal(counts.num_tied, reference.num_tied)
    np.testing.assert_array_equal(counts.num_tied[:9], 2)  # candidates 3, 5, 11 are one vector


@pytest.mark.parametrize("chunk_size", [1, 3, 4096])
def test_identical_candidates_always_tie(chunk_size):
    # Copies of one vector scattered over the pool must tie exactly with each other whatever
    # their columns: BLAS can round one query's dot products with identical columns differently.
    rng = np.random.default_rng(5)
    candidates = rng.normal(size=(61, 300)).astype(np.float32)
    copies = [2, 9, 17, 33, 47, 60]
    candidates[copies] = candidates[2]
    queries = rng.normal(size=(11, 300)).astype(np.float32)
    gold = np.full(11, 33)
    counts = metrics.rank_counts_from_embeddings(queries, candidates, gold, chunk_size=chunk_size)
    np.testing.assert_array_equal(counts.num_tied, len(copies) - 1)
    unit_queries, unit_candidates = _normalized_f32(queries), _normalized_f32(candidates)
    for i in range(11):
        # A float64 reference: the copies are level, the others clearly above or below.
        exact = unit_candidates.astype(np.float64) @ unit_queries[i].astype(np.float64)
        assert counts.num_higher[i] == np.count_nonzero(exact > exact[33] + 1e-6)


def test_embedding_path_is_cosine_with_exact_ties():
    # Values are powers of two and every row already has unit norm, so each dot product is exact
    # in float32 and the expected ranks follow by hand.
    queries = np.array([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    candidates = np.array(
        [
            [0.0, 1.0, 0.0, 0.0],  # q0: 0.0, q1: 0.5
            [2.0, 0.0, 0.0, 0.0],  # q0: 1.0, q1: 0.5 (scaled by 2: cosine ignores the norm)
            [0.5, 0.5, 0.5, 0.5],  # q0: 0.5, q1: 1.0
            [1.0, 0.0, 0.0, 0.0],  # q0: 1.0 (ties with candidate 1), q1: 0.5
        ]
    )
    ranks = metrics.ranks_from_embeddings(queries, candidates, np.array([3, 0]), chunk_size=1)
    np.testing.assert_array_equal(ranks, [1, 2])
    # q0's gold (candidate 3) ties with candidate 1 at the top; q1's gold (candidate 0) has
    # candidate 2 above it and candidates 1 and 3 level with it.
    counts = metrics.rank_counts_from_embeddings(queries, candidates, np.array([3, 0]))
    np.testing.assert_array_equal(counts.num_higher, [0, 1])
    np.testing.assert_array_equal(counts.num_tied, [1, 2])
    result = metrics.retrieval_metrics_from_embeddings(
        queries, candidates, np.array([3, 0]), ks=(1, 2)
    )
    assert result["num_tied_queries"] == 2
    assert result["hits@1"] == pytest.approx((1 / 2 + 0) / 2)
    assert result["hits@2"] == pytest.approx((1 + 1 / 3) / 2)
    assert result["mean_rank"] == pytest.approx((1.5 + 3.0) / 2)


def test_embedding_path_validation():
    queries = np.ones((3, 4))
    candidates = np.ones((5, 4))
    gold = np.array([0, 1, 2])
    with pytest.raises(ValueError, match="NaN or inf"):
        bad = queries.copy()
        bad[1, 2] = np.nan
        metrics.retrieval_metrics_from_embeddings(bad, candidates, gold)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        metrics.retrieval_metrics_from_embeddings(queries, candidates, np.array([0, 1, 5]))
    with pytest.raises(ValueError, match="embedding size"):
        metrics.retrieval_metrics_from_embeddings(queries, np.ones((5, 3)), gold)
    with pytest.raises(ValueError, match="chunk_size"):
        metrics.retrieval_metrics_from_embeddings(queries, candidates, gold, chunk_size=0)


def test_inbatch_accuracy_with_partial_last_batch():
    e0, e1, e2 = np.eye(3)
    # Batches of 2 pairs: {0, 1}, {2, 3}, {4}.
    queries = np.stack([e0, e0, e2, e1, e0])
    candidates = np.stack([e0, e1, e2, e1, e2])
    # Pair 0: own 1.0 vs 0.0 -> correct. Pair 1: own 0.0 < 1.0 for candidate 0 -> wrong.
    # Pairs 2, 3: correct. Pair 4 is alone in its batch -> correct, although candidate 0 would
    # beat it in the full pool.
    accuracy = metrics.inbatch_top1_accuracy(queries, candidates, batch_size=2)
    assert accuracy == pytest.approx(4 / 5)  # not 3/4 (last batch dropped), not 5/6 (per batch)
    assert metrics.inbatch_top1_accuracy(queries, candidates, batch_size=64) == pytest.approx(3 / 5)
    assert metrics.inbatch_top1_accuracy(queries, candidates, batch_size=1) == 1.0


def test_inbatch_accuracy_counts_ties_as_correct():
    queries = np.array([[1.0, 0.0], [1.0, 0.0]])
    candidates = np.array([[3.0, 0.0], [1.0, 0.0]])  # same direction: both cosines are 1.0
    assert metrics.inbatch_top1_accuracy(queries, candidates) == 1.0


# Four aligned pairs in R^4. Query 1 leans towards candidate 0 (score 1/|q1| against its own
# 0.5/|q1|), so it is wrong exactly when pairs 0 and 1 share a batch; every other query is right.
CONFUSABLE_QUERIES = np.array(
    [[1.0, 0.0, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)
CONFUSABLE_CANDIDATES = np.eye(4)


def _confusable_accuracy_by_hand(order):
    """3/4 when pairs 0 and 1 land in the same batch of 2 in `order`, else 1."""
    position = {pair: i for i, pair in enumerate(order)}
    return 3 / 4 if position[0] // 2 == position[1] // 2 else 1.0


def test_inbatch_accuracy_seeded_shuffle_by_hand():
    outcomes = set()
    for seed in range(12):
        order = np.random.default_rng(seed).permutation(4)
        expected = _confusable_accuracy_by_hand(order.tolist())
        outcomes.add(expected)
        got = metrics.inbatch_top1_accuracy(
            CONFUSABLE_QUERIES, CONFUSABLE_CANDIDATES, batch_size=2, shuffle_seed=seed
        )
        assert got == expected, (seed, order)
        np.testing.assert_array_equal(metrics.inbatch_order(4, seed), order)
        # The same as shuffling both sides by hand and keeping that order.
        assert got == metrics.inbatch_top1_accuracy(
            CONFUSABLE_QUERIES[order], CONFUSABLE_CANDIDATES[order], batch_size=2
        )
    assert outcomes == {3 / 4, 1.0}  # the seeds exercise both cases


def test_inbatch_accuracy_without_seed_keeps_file_order():
    # File order puts pairs 0 and 1 together: 3/4, today's behaviour.
    assert metrics.inbatch_top1_accuracy(
        CONFUSABLE_QUERIES, CONFUSABLE_CANDIDATES, batch_size=2
    ) == pytest.approx(3 / 4)
    assert metrics.inbatch_top1_accuracy(
        CONFUSABLE_QUERIES, CONFUSABLE_CANDIDATES, batch_size=2, shuffle_seed=None
    ) == pytest.approx(3 / 4)
    np.testing.assert_array_equal(metrics.inbatch_order(5), np.arange(5))
    # The order is a permutation of the pairs, the same for every call with one seed.
    order = metrics.inbatch_order(100, 7)
    np.testing.assert_array_equal(np.sort(order), np.arange(100))
    np.testing.assert_array_equal(order, metrics.inbatch_order(100, 7))


def test_inbatch_accuracy_from_scores_by_hand():
    # Five pairs; row = query, column = candidate, pair i on the diagonal.
    scores = np.array(
        [
            [5, 1, 0, 9, 0],  # candidate 3 beats the own 5
            [1, 5, 0, 0, 0],
            [0, 7, 5, 0, 0],  # candidate 1 beats the own 5
            [0, 0, 0, 5, 5],  # candidate 4 ties the own 5: counts as correct
            [0, 0, 0, 0, 5],
        ]
    )
    # File order, batches {0,1} {2,3} {4}: every query is right inside its batch.
    assert metrics.inbatch_top1_accuracy_from_scores(scores, batch_size=2) == 1.0
    # One batch: queries 0 and 2 are wrong.
    assert metrics.inbatch_top1_accuracy_from_scores(scores, batch_size=5) == pytest.approx(3 / 5)
    for seed in range(6):
        order = np.random.default_rng(seed).permutation(5)
        batch_of = {pair: i // 2 for i, pair in enumerate(order.tolist())}
        wrong = (batch_of[0] == batch_of[3]) + (batch_of[2] == batch_of[1])
        got = metrics.inbatch_top1_accuracy_from_scores(scores, batch_size=2, shuffle_seed=seed)
        assert got == pytest.approx((5 - wrong) / 5), (seed, order)


def test_inbatch_accuracy_from_scores_matches_embeddings():
    unit = _normalized_f32(CONFUSABLE_QUERIES) @ _normalized_f32(CONFUSABLE_CANDIDATES).T
    for seed in (None, 0, 1, 2, 3):
        for batch_size in (1, 2, 3, 64):
            assert metrics.inbatch_top1_accuracy_from_scores(
                unit, batch_size=batch_size, shuffle_seed=seed
            ) == metrics.inbatch_top1_accuracy(
                CONFUSABLE_QUERIES,
                CONFUSABLE_CANDIDATES,
                batch_size=batch_size,
                shuffle_seed=seed,
            ), (seed, batch_size)


@pytest.mark.parametrize("seed", [-1, 1.5, True, "3"])
def test_inbatch_bad_seed_raises(seed):
    with pytest.raises(ValueError, match="shuffle_seed"):
        metrics.inbatch_top1_accuracy(np.eye(3), np.eye(3), shuffle_seed=seed)
    with pytest.raises(ValueError, match="shuffle_seed"):
        metrics.inbatch_top1_accuracy_from_scores(np.eye(3), shuffle_seed=seed)


def test_inbatch_accuracy_from_scores_validation():
    with pytest.raises(ValueError, match="square"):
        metrics.inbatch_top1_accuracy_from_scores(np.ones((3, 4)))
    with pytest.raises(ValueError, match="batch_size"):
        metrics.inbatch_top1_accuracy_from_scores(np.ones((3, 3)), batch_size=0)


def test_inbatch_accuracy_validation():
    with pytest.raises(ValueError, match="aligned pairs"):
        metrics.inbatch_top1_accuracy(np.ones((3, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="batch_size"):
        metrics.inbatch_top1_accuracy(np.ones((3, 2)), np.ones((3, 2)), batch_size=0)


def test_module_does_not_import_jax():
    code = "import sys, jaxmol.metrics; assert 'jax' not in sys.modules, 'jax was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# Modality gap (paired vs unpaired text–molecule distances).


def test_modality_gap_by_hand():
    # Unit rows: t = (e0, e1, e0); m = (e0, e0, e1). Paired distances 0, √2, √2.
    # Unpaired (i != j): d(t0,m1)=0, d(t0,m2)=√2, d(t1,m0)=√2, d(t1,m2)=0, d(t2,m0)=0,
    # d(t2,m1)=0 -> mean √2/3. Centroids (2/3, 1/3) and (2/3, 1/3) coincide.
    e0, e1 = [1.0, 0.0], [0.0, 1.0]
    gap = metrics.modality_gap(np.array([e0, e1, e0]), 3.0 * np.array([e0, e0, e1]))
    root2 = np.sqrt(2.0)
    assert gap["paired_mean"] == pytest.approx(2 * root2 / 3)
    assert gap["unpaired_mean"] == pytest.approx(2 * root2 / 6)
    assert gap["gap"] == pytest.approx(2 * root2 / 6 - 2 * root2 / 3)
    assert gap["ratio"] == pytest.approx(2.0)
    assert gap["centroid_distance"] == pytest.approx(0.0, abs=1e-7)
    assert gap["num_pairs"] == 3
    assert all(isinstance(gap[k], float) for k in gap if k != "num_pairs")


def test_modality_gap_matches_loops_chunked_and_shifted_clouds():
    rng = np.random.default_rng(0)
    texts = rng.standard_normal((7, 5))
    mols = texts + 0.3 * rng.standard_normal((7, 5))
    unit_t = texts / np.linalg.norm(texts, axis=1, keepdims=True)
    unit_m = mols / np.linalg.norm(mols, axis=1, keepdims=True)
    unpaired = [np.linalg.norm(unit_t[i] - unit_m[j]) for i in range(7) for j in range(7) if i != j]
    for chunk_size in (1, 3, 2048):
        gap = metrics.modality_gap(texts, mols, chunk_size=chunk_size)
        assert gap["paired_mean"] == pytest.approx(np.linalg.norm(unit_t - unit_m, axis=1).mean())
        assert gap["unpaired_mean"] == pytest.approx(np.mean(unpaired), rel=1e-6)
        assert gap["gap"] > 0  # pairs are closer than non-pairs here
    # Identical modalities: no paired distance, no centroid gap.
    same = metrics.modality_gap(texts, texts)
    assert same["paired_mean"] == pytest.approx(0.0, abs=1e-6)
    assert same["centroid_distance"] == pytest.approx(0.0, abs=1e-6)
    # Molecules in their own region (a constant offset): the centroid distance grows.
    shifted = metrics.modality_gap(texts, texts + 5.0)
    assert shifted["centroid_distance"] > 0.5 and shifted["ratio"] > 0.5


def test_modality_gap_validation():
    with pytest.raises(ValueError, match="aligned pairs"):
        metrics.modality_gap(np.ones((3, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="at least 2 pairs"):
        metrics.modality_gap(np.ones((1, 2)), np.ones((1, 2)))
    with pytest.raises(ValueError, match="NaN or inf"):
        metrics.modality_gap(np.array([[1.0, np.nan], [0.0, 1.0]]), np.ones((2, 2)))
