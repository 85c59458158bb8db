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
        "tie_policy",
    }
    assert result["hits@2"] == 0.5
    assert result["hits@5"] == 0.75
    assert result["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 8) / 4)
    assert result["mean_rank"] == 4.0
    assert result["median_rank"] == 3.5
    json.dumps(result)  # metrics.json must be writable without conversion


def test_ties_are_optimistic():
    scores = np.array(
        [
            [0.5, 0.5, 0.5, 0.1],  # gold 1 ties with 0 and 2 -> rank 1
            [0.7, 0.5, 0.5, 0.9],  # gold 2: 0.7 and 0.9 beat it, the tie at 0.5 does not -> 3
            [0.3, 0.3, 0.3, 0.3],  # everything tied -> rank 1
        ]
    )
    np.testing.assert_array_equal(metrics.ranks_from_scores(scores, np.array([1, 2, 3])), [1, 3, 1])
    assert "strictly higher" in metrics.TIE_POLICY


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


def test_inbatch_accuracy_validation():
    with pytest.raises(ValueError, match="aligned pairs"):
        metrics.inbatch_top1_accuracy(np.ones((3, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="batch_size"):
        metrics.inbatch_top1_accuracy(np.ones((3, 2)), np.ones((3, 2)), batch_size=0)


def test_module_does_not_import_jax():
    code = "import sys, jaxmol.metrics; assert 'jax' not in sys.modules, 'jax was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
