"""Ranking metrics for cross-modal retrieval (pure NumPy, no JAX).

Every query has exactly one gold candidate in a pool of C candidates. For query i let

    h_i = #{j : scores[i, j] > scores[i, gold_i]}                 (candidates strictly higher)
    t_i = #{j != gold_i : scores[i, j] == scores[i, gold_i]}      (other candidates tied with it)

(`RankCounts`). Ties are resolved three ways, and every metrics dict reports all three:

* **expected** (the headline, `TIE_POLICY`): ties are broken uniformly at random, so the gold
  rank is uniform on h+1, ..., h+t+1 and each metric is its expectation over that draw;
* **optimistic**: rank = 1 + h (the gold candidate wins every tie);
* **pessimistic**: rank = 1 + h + t (it loses every tie).

Per query (r = the rank, k = a cut-off):

    metric          optimistic     pessimistic        expected
    rank            1 + h          1 + h + t          1 + h + t/2
    [r <= k]        [1 + h <= k]   [1 + h + t <= k]   clip((k - h) / (t + 1), 0, 1)
    1 / r           1 / (1 + h)    1 / (1 + h + t)    (H(h + t + 1) - H(h)) / (t + 1)

with H(n) = 1 + 1/2 + ... + 1/n the n-th harmonic number. Over the queries: hits@k = mean
[r <= k], mrr = mean 1/r, mean_rank = mean r, median_rank = median r (for `expected`, the median
of the per-query expected ranks). Without ties (t = 0 everywhere) the three agree exactly.
Argsort-based rankers (text2mol's `ranker.py`, MoMu's `torch.sort`) break ties by index order, so
their numbers fall anywhere between the two bounds on degenerate embeddings; duplicated
descriptions or molecules with identical graphs do make exact ties happen.

Several queries may share one gold candidate (many texts describing one molecule), and a
candidate index may be gold for no query at all.

Two evaluation protocols from the literature map onto these functions:

* text2mol / CMTMR on ChEBI-20: full-pool ranking, `retrieval_metrics_from_embeddings`.
* MoMu on PCdes: "Acc" is `inbatch_top1_accuracy` (top-1 inside batches of 64, after an optional
  seeded shuffle of the pairs), and "Recall@20" is hits@20 of the full-pool ranking, i.e.
  `recall_at_k(ranks, 20)`. MoMu's code names the two directions of Recall@20 crosswise relative
  to Acc (`rec@20_1` ranks graphs for each text); callers must label directions explicitly.
"""

from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

TIE_POLICY = (
    "expected under uniformly random tie-breaking: with h candidates scoring strictly higher "
    "than the gold and t others tied with it, the gold rank is uniform on h+1..h+t+1; "
    "'optimistic' (rank h+1) and 'pessimistic' (rank h+t+1) give the bounds"
)
# Reported instead of TIE_POLICY when `metrics_from_ranks` gets plain ranks: the caller did not
# say how many candidates tied, so the three policies collapse onto the ranks it gave.
TIE_POLICY_RANKS_ONLY = (
    "ranks given without tie counts: ties unknown and counted as none, so optimistic, "
    "pessimistic and expected all equal the given ranks"
)
DEFAULT_KS = (1, 5, 10, 20)
# Guards the L2 normalisation of an all-zero embedding (it becomes the zero vector, which then
# ties with every candidate at score 0) instead of producing NaN.
_NORM_EPS = 1e-12


class RankCounts(NamedTuple):
    """Where each query's gold candidate stands in its pool, with ties kept apart.

    Attributes:
        num_higher: [Q] int64, candidates scoring strictly higher than the gold one (h).
        num_tied: [Q] int64, other candidates scoring exactly the gold score (t).
    """

    num_higher: np.ndarray
    num_tied: np.ndarray

    @property
    def optimistic(self) -> np.ndarray:
        """[Q] int64 ranks 1 + h (the gold candidate wins every tie)."""
        return 1 + self.num_higher

    @property
    def pessimistic(self) -> np.ndarray:
        """[Q] int64 ranks 1 + h + t (the gold candidate loses every tie)."""
        return 1 + self.num_higher + self.num_tied

    @property
    def expected(self) -> np.ndarray:
        """[Q] float64 ranks 1 + h + t/2 (the mean under uniformly random tie-breaking)."""
        return 1.0 + self.num_higher + 0.5 * self.num_tied


def _check_gold(gold: np.ndarray, num_queries: int, pool_size: int) -> np.ndarray:
    """Validates gold indices: shape [Q], integer dtype, each in [0, pool_size)."""
    gold = np.asarray(gold)
    if gold.ndim != 1 or gold.shape[0] != num_queries:
        raise ValueError(
            f"gold must have shape [Q] = [{num_queries}] (one index per query), got {gold.shape}"
        )
    if not np.issubdtype(gold.dtype, np.integer):
        raise ValueError(f"gold must hold integer candidate indices, got dtype {gold.dtype}")
    if num_queries and (gold.min() < 0 or gold.max() >= pool_size):
        bad = gold[(gold < 0) | (gold >= pool_size)]
        raise ValueError(
            f"gold indices must lie in [0, {pool_size}) (the candidate pool), "
            f"got out-of-range values such as {bad[:5].tolist()}"
        )
    return gold.astype(np.int64, copy=False)


def _check_scores(scores: np.ndarray) -> np.ndarray:
    """Validates a real-valued [Q, C] score matrix with Q >= 1, C >= 1 and no NaN."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape [Q, C], got {scores.shape}")
    if not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
        raise ValueError(f"scores must be real numbers, got dtype {scores.dtype}")
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores needs at least one query and one candidate, got {scores.shape}")
    if np.issubdtype(scores.dtype, np.floating) and np.isnan(scores).any():
        bad_rows = np.flatnonzero(np.isnan(scores).any(axis=1))
        raise ValueError(
            f"scores contain NaN in {bad_rows.size} query row(s) (first: {bad_rows[:5].tolist()}); "
            "a NaN has no rank, so the metrics would be meaningless"
        )
    return scores


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"every k in ks must be a positive integer, got {ks}")
    return ks


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _count_higher_and_tied(scores: np.ndarray, gold: np.ndarray) -> RankCounts:
    """Counts, per row, the candidates above and level with the gold column (no validation).

    Args:
        scores: [N, C] scores of N queries against the whole pool.
        gold: [N] int64 gold column per row.

    Returns:
        `RankCounts` of [N] int64 arrays.
    """
    # The gold score is read from the very matrix being ranked, so a candidate whose score is
    # bit-identical to the gold one ties with it instead of winning on a rounding difference.
    gold_scores = scores[np.arange(scores.shape[0]), gold][:, None]  # [N, 1]
    num_higher = np.count_nonzero(scores > gold_scores, axis=1)  # [N]
    # The gold column equals itself, hence the -1. One [N, C] boolean mask lives at a time.
    num_tied = np.count_nonzero(scores == gold_scores, axis=1) - 1  # [N]
    return RankCounts(num_higher.astype(np.int64), num_tied.astype(np.int64))


def rank_counts_from_scores(scores: np.ndarray, gold: np.ndarray) -> RankCounts:
    """Counts the candidates above and tied with each query's gold candidate.

    Args:
        scores: [Q, C] real scores, higher = more similar. NaN is rejected; +-inf are ranked
            (two equal infinities tie).
        gold: [Q] integer index of each query's gold candidate, in [0, C).

    Returns:
        `RankCounts`: num_higher [Q] and num_tied [Q], int64, with num_higher + num_tied < C.

    Raises:
        ValueError: on a wrong shape or dtype, an out-of-range gold index, or any NaN score.
    """
    scores = _check_scores(scores)
    gold = _check_gold(gold, scores.shape[0], scores.shape[1])
    return _count_higher_and_tied(scores, gold)


def ranks_from_scores(scores: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Computes the optimistic 1-based rank of each query's gold candidate.

    rank_i = 1 + #{j : scores[i, j] > scores[i, gold[i]]}; a tie never pushes the gold candidate
    down. Use `rank_counts_from_scores` to keep the ties (the headline metrics need them).

    Args:
        scores: [Q, C] real scores, higher = more similar. NaN is rejected.
        gold: [Q] integer index of each query's gold candidate, in [0, C).

    Returns:
        [Q] int64 ranks in [1, C].

    Raises:
        ValueError: on a wrong shape or dtype, an out-of-range gold index, or any NaN score.
    """
    return rank_counts_from_scores(scores, gold).optimistic


def _as_rank_counts(ranks) -> tuple[RankCounts, bool]:
    """Reads plain ranks [Q] or a pair (num_higher [Q], num_tied [Q]) into `RankCounts`.

    Returns:
        The counts and whether tie counts were given (plain ranks get num_tied = 0).
    """
    if isinstance(ranks, tuple) and len(ranks) == 2 and all(np.ndim(x) == 1 for x in ranks):
        higher, tied = np.asarray(ranks[0]), np.asarray(ranks[1])
        for name, array in (("num_higher", higher), ("num_tied", tied)):
            if not np.issubdtype(array.dtype, np.integer):
                raise ValueError(f"{name} must be integers, got dtype {array.dtype}")
            if array.size and array.min() < 0:
                raise ValueError(f"{name} must be >= 0, got min {array.min()}")
        if higher.shape != tied.shape or higher.size == 0:
            raise ValueError(
                "num_higher and num_tied must both have shape [Q] with Q >= 1, "
                f"got {higher.shape} and {tied.shape}"
            )
        return RankCounts(higher.astype(np.int64), tied.astype(np.int64)), True
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f"ranks must have shape [Q] with Q >= 1, got {ranks.shape}")
    if not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks must be integers, got dtype {ranks.dtype}")
    if ranks.min() < 1:
        raise ValueError(f"ranks must be >= 1, got min {ranks.min()}")
    higher = ranks.astype(np.int64) - 1
    return RankCounts(higher, np.zeros_like(higher)), False


def _expected_hits(counts: RankCounts, k: int) -> np.ndarray:
    """[Q] float64 probability that the gold rank is <= k under random tie-breaking.

    The rank is uniform on the t + 1 values h+1..h+t+1, of which clip(k - h, 0, t + 1) are <= k.
    """
    h = counts.num_higher.astype(np.float64)
    t = counts.num_tied.astype(np.float64)
    return np.clip((k - h) / (t + 1.0), 0.0, 1.0)


def _expected_reciprocal_ranks(counts: RankCounts) -> np.ndarray:
    """[Q] float64 mean of 1/r over r = h+1..h+t+1, through harmonic-number differences."""
    h, t = counts.num_higher, counts.num_tied
    top = int((h + t).max()) + 1
    # harmonic[n] = 1 + 1/2 + ... + 1/n, harmonic[0] = 0; one table for the whole batch of
    # queries, so the cost is O(Q + max rank) whatever the number of ties.
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, top + 1, dtype=np.float64))])
    tied_mean = (harmonic[h + t + 1] - harmonic[h]) / (t + 1.0)
    # Untied queries take 1/(h+1) directly: the difference of two large harmonic numbers would
    # lose the last bits, and then the three policies would not agree exactly without ties.
    return np.where(t == 0, 1.0 / (h + 1.0), tied_mean)


def _summary(
    per_query_hits: dict[str, np.ndarray], reciprocal: np.ndarray, ranks: np.ndarray
) -> dict[str, float]:
    """Means over queries of per-query hits [Q], reciprocal ranks [Q] and ranks [Q]."""
    ranks = ranks.astype(np.float64)
    return {
        **{name: float(np.mean(hits)) for name, hits in per_query_hits.items()},
        "mrr": float(np.mean(reciprocal)),
        "mean_rank": float(np.mean(ranks)),
        "median_rank": float(np.median(ranks)),
    }


def recall_at_k(ranks, k: int) -> float:
    """Fraction of queries whose gold candidate is among the top k: mean_i [r_i <= k].

    This is hits@k under another name. MoMu's "Recall@20" on PCdes is exactly hits@20 of the
    full-pool ranking (one gold per query), so `recall_at_k(ranks, 20)` reproduces it.

    Args:
        ranks: [Q] 1-based ranks (e.g. from `ranks_from_scores`), or `RankCounts` /
            (num_higher [Q], num_tied [Q]), which give the expectation under random
            tie-breaking (the headline 'hits@k' of `metrics_from_ranks`).
        k: cut-off, a positive integer.

    Returns:
        A Python float in [0, 1].
    """
    (k,) = _check_ks((k,))
    if isinstance(ranks, tuple):
        counts, _ = _as_rank_counts(ranks)
        return float(np.mean(_expected_hits(counts, k)))
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f"ranks must have shape [Q] with Q >= 1, got {ranks.shape}")
    return float(np.mean(ranks <= k))


def metrics_from_ranks(
    ranks, *, ks: Iterable[int] = DEFAULT_KS, pool_size: int
) -> dict[str, float | int | str | dict[str, float]]:
    """Summarises gold ranks into retrieval metrics under the three tie policies.

    Args:
        ranks: either `RankCounts` (or a tuple (num_higher [Q], num_tied [Q]) of non-negative
            integers), as `rank_counts_from_scores` / `rank_counts_from_embeddings` return; or
            plain [Q] integer 1-based ranks, which carry no tie information and are treated as
            untied (all three policies then equal them, and 'tie_policy' says so).
        ks: cut-offs for 'hits@k' (a k >= pool_size trivially gives 1.0).
        pool_size: number of candidates C each query was ranked against (reported, and used to
            check the ranks).

    Returns:
        JSON-serialisable dict. Headline (expected under random tie-breaking): 'hits@k' for
        every k in ks (fractions in [0, 1]), 'mrr', 'mean_rank', 'median_rank'. Then
        'num_queries', 'pool_size', 'num_tied_queries' (queries whose gold candidate ties with
        at least one other), 'tie_policy' (`TIE_POLICY`, or `TIE_POLICY_RANKS_ONLY` for plain
        ranks), and 'optimistic' and 'pessimistic': dicts with the same 'hits@k', 'mrr',
        'mean_rank' and 'median_rank' under those rules.

    Raises:
        ValueError: on empty or non-integer input, or ranks outside [1, pool_size].
    """
    ks = _check_ks(ks)
    counts, have_ties = _as_rank_counts(ranks)
    if isinstance(pool_size, bool) or int(pool_size) < 1:
        raise ValueError(f"pool_size must be >= 1, got {pool_size}")
    worst = int(counts.pessimistic.max())
    if worst > pool_size:
        raise ValueError(
            f"ranks must lie in [1, pool_size={pool_size}], got a rank up to {worst} "
            "(1 + num_higher + num_tied)"
        )
    optimistic, pessimistic = counts.optimistic, counts.pessimistic
    expected = _summary(
        {f"hits@{k}": _expected_hits(counts, k) for k in ks},
        _expected_reciprocal_ranks(counts),
        counts.expected,
    )
    metrics: dict[str, float | int | str | dict[str, float]] = {
        **expected,
        "num_queries": int(optimistic.size),
        "pool_size": int(pool_size),
        "num_tied_queries": int(np.count_nonzero(counts.num_tied)),
        "tie_policy": TIE_POLICY if have_ties else TIE_POLICY_RANKS_ONLY,
    }
    for name, bound in (("optimistic", optimistic), ("pessimistic", pessimistic)):
        metrics[name] = _summary(
            {f"hits@{k}": bound <= k for k in ks}, 1.0 / bound.astype(np.float64), bound
        )
    return metrics


def retrieval_metrics(
    scores: np.ndarray, gold: np.ndarray, *, ks: Iterable[int] = DEFAULT_KS
) -> dict[str, float | int | str | dict[str, float]]:
    """Ranks every query's gold candidate in a full score matrix and summarises the ranks.

    Args:
        scores: [Q, C] real scores, higher = more similar. NaN is rejected.
        gold: [Q] integer index of each query's gold candidate, in [0, C). Several queries may
            share one gold candidate.
        ks: cut-offs for 'hits@k'.

    Returns:
        The dict of `metrics_from_ranks` (tie-aware) with pool_size = C.

    Raises:
        ValueError: on a wrong shape or dtype, an out-of-range gold index, or any NaN score.
    """
    counts = rank_counts_from_scores(scores, gold)
    return metrics_from_ranks(counts, ks=ks, pool_size=np.shape(scores)[1])


def l2_normalize_rows(embeddings: np.ndarray, name: str = "embeddings") -> np.ndarray:
    """Validates a finite [N, D] embedding matrix and returns its rows at unit L2 norm.

    The division runs in float64 and the result is rounded once to float32, the dtype every
    score matmul below uses.
    """
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
        raise ValueError(f"{name} must have shape [N, D] with N, D >= 1, got {embeddings.shape}")
    if not np.issubdtype(embeddings.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got dtype {embeddings.dtype}")
    if not np.isfinite(embeddings).all():
        bad_rows = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
        raise ValueError(
            f"{name} contain NaN or inf in {bad_rows.size} row(s) "
            f"(first: {bad_rows[:5].tolist()}); refusing to rank them"
        )
    embeddings = embeddings.astype(np.float64)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)  # [N, 1]
    return (embeddings / np.maximum(norms, _NORM_EPS)).astype(np.float32)


def modality_gap(text_emb: np.ndarray, mol_emb: np.ndarray, *, chunk_size: int = 2048) -> dict:
    """How far apart the two modalities sit: paired vs unpaired text–molecule distances.

    On L2-normalised rows t_i, m_i (row i of each is a pair), with d(x, y) = ||x - y|| (so
    d^2 = 2 - 2 cos, in [0, 2]):

        paired_mean   = mean_i d(t_i, m_i)
        unpaired_mean = mean_{i != j} d(t_i, m_j)          (all N (N - 1) combinations, exact)
        gap           = unpaired_mean - paired_mean        (larger: pairs stand out more)
        ratio         = paired_mean / unpaired_mean        (1: pairs are no closer than chance)
        centroid_distance = ||mean_i t_i - mean_i m_i||    (Liang et al. 2022's "modality gap":
                                                            0 when the two clouds share a centre)

    `gap` is the quantity `jaxmol.plots.plot_modality_gap` draws (there from a sample of
    unpaired combinations; here every one). Cost O(N^2 D), in row chunks of `chunk_size`.

    Args:
        text_emb: [N, D] finite text embeddings (any norm; rows are normalised here).
        mol_emb: [N, D] finite molecule embeddings; row i pairs with text row i. N >= 2.
        chunk_size: text rows per distance block.

    Returns:
        {'paired_mean', 'unpaired_mean', 'gap', 'ratio', 'centroid_distance'} as Python
        floats and 'num_pairs' (N) as an int.

    Raises:
        ValueError: shapes that differ, N < 2, or NaN/inf entries.

    Example:
        >>> import numpy as np
        >>> gap = modality_gap(np.eye(2), np.eye(2))
        >>> round(gap['paired_mean'], 6), round(gap['unpaired_mean'], 6), round(gap['ratio'], 6)
        (0.0, 1.414214, 0.0)
    """
    texts = l2_normalize_rows(text_emb, "text_emb").astype(np.float64)  # [N, D]
    molecules = l2_normalize_rows(mol_emb, "mol_emb").astype(np.float64)  # [N, D]
    if texts.shape != molecules.shape:
        raise ValueError(
            f"text_emb and mol_emb must be aligned pairs of one shape, got {texts.shape} and "
            f"{molecules.shape}"
        )
    n = texts.shape[0]
    if n < 2:
        raise ValueError(f"the modality gap needs at least 2 pairs, got {n}")
    chunk_size = _check_positive_int(chunk_size, "chunk_size")
    paired = np.linalg.norm(texts - molecules, axis=1)  # [N]
    text_sq = np.sum(texts * texts, axis=1)  # [N]
    mol_sq = np.sum(molecules * molecules, axis=1)  # [N]
    total = 0.0
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        squared = (
            text_sq[start:stop, None] + mol_sq[None, :] - 2.0 * (texts[start:stop] @ molecules.T)
        )
        distances = np.sqrt(np.maximum(squared, 0.0))  # [c, N]
        rows = np.arange(start, stop)
        distances[rows - start, rows] = 0.0  # the pairs themselves are not unpaired
        total += float(distances.sum())
    paired_mean = float(paired.mean())
    unpaired_mean = total / (n * (n - 1))
    return {
        "paired_mean": paired_mean,
        "unpaired_mean": unpaired_mean,
        "gap": unpaired_mean - paired_mean,
        "ratio": paired_mean / unpaired_mean if unpaired_mean > 0 else float("nan"),
        "centroid_distance": float(np.linalg.norm(texts.mean(axis=0) - molecules.mean(axis=0))),
        "num_pairs": int(n),
    }


class _DistinctRows(NamedTuple):
    """The distinct rows of a candidate matrix and how the original rows map onto them."""

    rows: np.ndarray  # [U, D] distinct rows (sorted by their bytes)
    inverse: np.ndarray  # [C] int64: original row c is rows[inverse[c]]
    extra: np.ndarray  # [U] int64: multiplicity - 1 (copies beyond the first)
    repeated: np.ndarray  # [R] int64: indices into rows of those with extra > 0


def _distinct_rows(candidates: np.ndarray) -> _DistinctRows:
    """Groups bit-identical rows of a float [C, D] matrix (after turning -0.0 into +0.0)."""
    # x + 0.0 maps -0.0 to +0.0 and keeps everything else, so equal vectors compare equal bytes.
    candidates = np.ascontiguousarray(candidates + candidates.dtype.type(0.0))
    row_bytes = candidates.dtype.itemsize * candidates.shape[1]
    keys = candidates.view(np.dtype((np.void, row_bytes))).ravel()  # [C] one opaque key per row
    _, first, inverse, counts = np.unique(
        keys, return_index=True, return_inverse=True, return_counts=True
    )
    extra = counts.astype(np.int64) - 1
    return _DistinctRows(candidates[first], inverse.astype(np.int64), extra, np.flatnonzero(extra))


def _count_against_distinct(
    queries: np.ndarray, distinct: _DistinctRows, gold: np.ndarray
) -> RankCounts:
    """`RankCounts` of cosine scores against candidates given as distinct rows (no validation).

    Args:
        queries: [N, D] float32 unit rows.
        distinct: `_distinct_rows` of the [C, D] float32 unit candidate rows.
        gold: [N] int64 gold index per query into the original C candidates.

    Returns:
        `RankCounts` over the original C candidates, [N] int64 each.
    """
    scores = queries @ distinct.rows.T  # [N, U] float32
    gold_column = distinct.inverse[gold]  # [N] the gold candidate's distinct row
    counts = _count_higher_and_tied(scores, gold_column)
    if distinct.repeated.size:
        # The distinct columns were counted once each; add the copies of repeated vectors.
        repeated_scores = scores[:, distinct.repeated]  # [N, R], R = number of repeated vectors
        gold_scores = scores[np.arange(scores.shape[0]), gold_column][:, None]  # [N, 1]
        weights = distinct.extra[distinct.repeated]  # [R]
        counts = RankCounts(
            counts.num_higher + (repeated_scores > gold_scores).astype(np.int64) @ weights,
            counts.num_tied + (repeated_scores == gold_scores).astype(np.int64) @ weights,
        )
    return counts


def rank_counts_from_embeddings(
    query_emb: np.ndarray, cand_emb: np.ndarray, gold: np.ndarray, *, chunk_size: int = 4096
) -> RankCounts:
    """Candidates above and tied with the gold one under cosine similarity, chunk by chunk.

    Both sides are L2-normalised, then for each chunk of at most `chunk_size` queries the
    [chunk, C] float32 cosine matrix is formed and counted. Peak extra memory is about
    5 * chunk_size * C bytes (float32 scores plus one boolean mask at a time), never Q * C.

    Exact ties are kept exact. Bit-identical candidate vectors (duplicated texts, molecules with
    identical graphs) are scored once and counted with their multiplicity: BLAS may round one
    query's dot products with two identical columns differently depending on where the columns
    sit (OpenBLAS does for a single query row), which would turn a tie into a win or a loss. And
    the gold score of query i is read from the chunk's own score matrix, not from a separate dot
    product that could differ in the last bit.

    Args:
        query_emb: [Q, D] query embeddings (any float dtype, finite).
        cand_emb: [C, D] candidate embeddings (any float dtype, finite).
        gold: [Q] integer index of each query's gold candidate, in [0, C).
        chunk_size: number of queries scored per matmul.

    Returns:
        `RankCounts`: num_higher [Q] and num_tied [Q], int64.

    Raises:
        ValueError: on wrong shapes, mismatched embedding sizes, non-finite embeddings, an
            out-of-range gold index or a non-positive chunk_size.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    queries = l2_normalize_rows(query_emb, "query_emb")  # [Q, D]
    candidates = l2_normalize_rows(cand_emb, "cand_emb")  # [C, D]
    if queries.shape[1] != candidates.shape[1]:
        raise ValueError(
            f"query_emb and cand_emb must share the embedding size D, "
            f"got {queries.shape[1]} and {candidates.shape[1]}"
        )
    num_queries = queries.shape[0]
    gold = _check_gold(gold, num_queries, candidates.shape[0])
    distinct = _distinct_rows(candidates)
    num_higher = np.empty(num_queries, dtype=np.int64)
    num_tied = np.empty(num_queries, dtype=np.int64)
    for start in range(0, num_queries, chunk_size):
        stop = min(start + chunk_size, num_queries)
        counts = _count_against_distinct(queries[start:stop], distinct, gold[start:stop])
        num_higher[start:stop], num_tied[start:stop] = counts
    return RankCounts(num_higher, num_tied)


def ranks_from_embeddings(
    query_emb: np.ndarray, cand_emb: np.ndarray, gold: np.ndarray, *, chunk_size: int = 4096
) -> np.ndarray:
    """Optimistic gold ranks (1 + #strictly higher) under cosine similarity, chunked.

    The optimistic ranks of `rank_counts_from_embeddings`, which documents the arguments and
    the memory bound; use that function to keep the ties.

    Returns:
        [Q] int64 ranks in [1, C].
    """
    return rank_counts_from_embeddings(query_emb, cand_emb, gold, chunk_size=chunk_size).optimistic


def retrieval_metrics_from_embeddings(
    query_emb: np.ndarray,
    cand_emb: np.ndarray,
    gold: np.ndarray,
    *,
    chunk_size: int = 4096,
    ks: Iterable[int] = DEFAULT_KS,
) -> dict[str, float | int | str | dict[str, float]]:
    """Full-pool cosine retrieval metrics without materialising the [Q, C] score matrix.

    Equivalent to `retrieval_metrics(q_hat @ c_hat.T, gold, ks=ks)` with row-normalised float32
    embeddings q_hat, c_hat, for any chunk_size (see `rank_counts_from_embeddings`).

    Args:
        query_emb: [Q, D] query embeddings.
        cand_emb: [C, D] candidate embeddings.
        gold: [Q] integer index of each query's gold candidate, in [0, C).
        chunk_size: number of queries scored per matmul (memory ~ 5 * chunk_size * C bytes).
        ks: cut-offs for 'hits@k'.

    Returns:
        The dict of `metrics_from_ranks` (tie-aware) with pool_size = C.
    """
    counts = rank_counts_from_embeddings(query_emb, cand_emb, gold, chunk_size=chunk_size)
    return metrics_from_ranks(counts, ks=ks, pool_size=np.shape(cand_emb)[0])


def inbatch_order(num_pairs: int, shuffle_seed: int | None = None) -> np.ndarray:
    """The order in which aligned pairs are cut into in-batch accuracy batches.

    Args:
        num_pairs: N, the number of aligned pairs.
        shuffle_seed: None keeps the given order; an integer >= 0 draws
            `np.random.default_rng(shuffle_seed).permutation(N)`, as MoMu's / CMTMR's fine-tuning
            evaluation shuffles its test ids before batching (their draw comes from NumPy's
            unseeded global generator: the procedure is the same, the permutation is not).

    Returns:
        [N] int64 pair indices; positions [0, B) form the first batch, and so on.
    """
    if shuffle_seed is None:
        return np.arange(num_pairs, dtype=np.int64)
    if isinstance(shuffle_seed, bool) or not isinstance(shuffle_seed, int | np.integer):
        raise ValueError(f"shuffle_seed must be None or an integer, got {shuffle_seed!r}")
    if shuffle_seed < 0:
        raise ValueError(f"shuffle_seed must be >= 0, got {shuffle_seed}")
    return np.random.default_rng(int(shuffle_seed)).permutation(num_pairs).astype(np.int64)


def inbatch_top1_accuracy(
    query_emb: np.ndarray,
    cand_emb: np.ndarray,
    *,
    batch_size: int = 64,
    shuffle_seed: int | None = None,
) -> float:
    """MoMu's in-batch "Acc": top-1 cosine accuracy within batches of aligned pairs.

    Pair i is (query_emb[i], cand_emb[i]). The pairs are put in `inbatch_order(N, shuffle_seed)`
    (the given order, or a seeded permutation applied to both sides alike) and cut into batches
    [0, B), [B, 2B), ...; the last batch keeps the remainder (MoMu's drop_last=False). Inside a
    batch each query is scored against that batch's candidates only, and it counts as correct
    when no candidate of its batch scores strictly higher than its own (a tie counts as correct,
    the optimistic rule). The result is

        accuracy = #correct / N          (averaged over all N queries, not over batches)

    so it depends on batch_size and on the order of the pairs.

    Args:
        query_emb: [N, D] query embeddings.
        cand_emb: [N, D] candidate embeddings aligned with the queries.
        batch_size: pairs per batch (MoMu uses 64).
        shuffle_seed: None = the given order; an integer >= 0 = a seeded shuffle first.

    Returns:
        A Python float in [0, 1].

    Raises:
        ValueError: on mismatched or empty inputs, non-finite embeddings, batch_size < 1 or a
            bad shuffle_seed.
    """
    batch_size = _check_positive_int(batch_size, "batch_size")
    queries = l2_normalize_rows(query_emb, "query_emb")  # [N, D]
    candidates = l2_normalize_rows(cand_emb, "cand_emb")  # [N, D]
    if queries.shape != candidates.shape:
        raise ValueError(
            "in-batch accuracy needs aligned pairs: query_emb and cand_emb must have the same "
            f"shape [N, D], got {queries.shape} and {candidates.shape}"
        )
    if shuffle_seed is not None:
        # One permutation for both sides keeps every pair together.
        order = inbatch_order(queries.shape[0], shuffle_seed)
        queries, candidates = queries[order], candidates[order]
    num_correct = 0
    for start in range(0, queries.shape[0], batch_size):
        stop = min(start + batch_size, queries.shape[0])
        batch_candidates = _distinct_rows(candidates[start:stop])  # exact ties, as above
        diagonal = np.arange(stop - start)  # pair i's own candidate is candidate i of its batch
        counts = _count_against_distinct(queries[start:stop], batch_candidates, diagonal)
        num_correct += int(np.count_nonzero(counts.num_higher == 0))
    return num_correct / queries.shape[0]


def inbatch_top1_accuracy_from_scores(
    scores: np.ndarray, *, batch_size: int = 64, shuffle_seed: int | None = None
) -> float:
    """`inbatch_top1_accuracy` on a precomputed score matrix of aligned pairs.

    Row i is query i, column i its own candidate. The pairs are ordered by
    `inbatch_order(N, shuffle_seed)` and cut into batches of `batch_size`; query i is correct
    when no column of its batch scores strictly higher than column i. Pass `scores.T` for the
    other direction.

    Args:
        scores: [N, N] real scores, higher = more similar; NaN is rejected.
        batch_size: pairs per batch (MoMu uses 64).
        shuffle_seed: None = the given order; an integer >= 0 = a seeded shuffle first.

    Returns:
        A Python float in [0, 1].

    Raises:
        ValueError: on a non-square or invalid score matrix, batch_size < 1 or a bad seed.
    """
    batch_size = _check_positive_int(batch_size, "batch_size")
    scores = _check_scores(scores)
    if scores.shape[0] != scores.shape[1]:
        raise ValueError(
            f"in-batch accuracy needs aligned pairs: scores must be square [N, N], got "
            f"{scores.shape}"
        )
    order = inbatch_order(scores.shape[0], shuffle_seed)
    num_correct = 0
    for start in range(0, len(order), batch_size):
        members = order[start : start + batch_size]  # [b] pair indices of this batch
        block = scores[np.ix_(members, members)]  # [b, b]: the batch's own queries x candidates
        num_higher = _count_higher_and_tied(block, np.arange(len(members))).num_higher
        num_correct += int(np.count_nonzero(num_higher == 0))
    return num_correct / len(order)
