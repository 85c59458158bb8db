"""Ranking metrics for cross-modal retrieval (pure NumPy, no JAX).

Every query has exactly one gold candidate in a pool of C candidates. Its 1-based rank is

    rank_i = 1 + #{j : scores[i, j] > scores[i, gold_i]}

so a candidate that *ties* with the gold one never pushes it down (optimistic tie policy,
`TIE_POLICY`). The policy is fixed and reported in every metrics dict, because argsort-based
rankers (text2mol's `ranker.py`) break ties by index order instead and can give different
numbers on degenerate embeddings.

From the ranks r_1..r_Q:

    hits@k      = mean_i [r_i <= k]            (a fraction in [0, 1])
    mrr         = mean_i 1 / r_i
    mean_rank   = mean_i r_i
    median_rank = median_i r_i

Several queries may share one gold candidate (many texts describing one molecule), and a
candidate index may be gold for no query at all.

Two evaluation protocols from the literature map onto these functions:

* text2mol / CMTMR on ChEBI-20: full-pool ranking, `retrieval_metrics_from_embeddings`.
* MoMu on PCdes: "Acc" is `inbatch_top1_accuracy` (top-1 inside consecutive batches of 64),
  and "Recall@20" is hits@20 of the full-pool ranking, i.e. `recall_at_k(ranks, 20)`. MoMu's
  code names the two directions of Recall@20 crosswise relative to Acc (`rec@20_1` ranks graphs
  for each text); callers must label directions explicitly.
"""

from collections.abc import Iterable

import numpy as np

TIE_POLICY = "optimistic: rank = 1 + #candidates scoring strictly higher than the gold"
DEFAULT_KS = (1, 5, 10, 20)
# Guards the L2 normalisation of an all-zero embedding (it becomes the zero vector, which then
# ties with every candidate at score 0) instead of producing NaN.
_NORM_EPS = 1e-12


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


def _gold_ranks(scores: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Optimistic ranks of the gold column of each row, without validation.

    Args:
        scores: [N, C] scores of N queries against the whole pool.
        gold: [N] int64 gold column per row.

    Returns:
        [N] int64 ranks in [1, C].
    """
    # The gold score is read from the very matrix being ranked, so a candidate whose score is
    # bit-identical to the gold one ties with it instead of winning on a rounding difference.
    gold_scores = scores[np.arange(scores.shape[0]), gold]  # [N]
    num_better = np.count_nonzero(scores > gold_scores[:, None], axis=1)  # [N]
    return 1 + num_better.astype(np.int64)


def ranks_from_scores(scores: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Computes the 1-based rank of each query's gold candidate.

    rank_i = 1 + #{j : scores[i, j] > scores[i, gold[i]]} (see `TIE_POLICY`).

    Args:
        scores: [Q, C] real scores, higher = more similar. NaN is rejected.
        gold: [Q] integer index of each query's gold candidate, in [0, C).

    Returns:
        [Q] int64 ranks in [1, C].

    Raises:
        ValueError: on a wrong shape or dtype, an out-of-range gold index, or any NaN score.
    """
    scores = _check_scores(scores)
    gold = _check_gold(gold, scores.shape[0], scores.shape[1])
    return _gold_ranks(scores, gold)


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """Fraction of queries whose gold candidate is among the top k: mean_i [r_i <= k].

    This is hits@k under another name. MoMu's "Recall@20" on PCdes is exactly hits@20 of the
    full-pool ranking (one gold per query), so `recall_at_k(ranks, 20)` reproduces it.

    Args:
        ranks: [Q] 1-based ranks (e.g. from `ranks_from_scores`).
        k: cut-off, a positive integer.

    Returns:
        A Python float in [0, 1].
    """
    (k,) = _check_ks((k,))
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f"ranks must have shape [Q] with Q >= 1, got {ranks.shape}")
    return float(np.mean(ranks <= k))


def metrics_from_ranks(
    ranks: np.ndarray, *, ks: Iterable[int] = DEFAULT_KS, pool_size: int
) -> dict[str, float | int | str]:
    """Summarises gold ranks into retrieval metrics.

    Args:
        ranks: [Q] integer 1-based ranks, each in [1, pool_size].
        ks: cut-offs for 'hits@k' (a k >= pool_size trivially gives 1.0).
        pool_size: number of candidates C each query was ranked against (reported, and used to
            check the ranks).

    Returns:
        JSON-serialisable dict with 'hits@k' for every k in ks (fractions in [0, 1]), 'mrr'
        (mean of 1 / r), 'mean_rank', 'median_rank', 'num_queries', 'pool_size' and
        'tie_policy' (`TIE_POLICY`).

    Raises:
        ValueError: on an empty or non-integer rank array, or ranks outside [1, pool_size].
    """
    ks = _check_ks(ks)
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f"ranks must have shape [Q] with Q >= 1, got {ranks.shape}")
    if not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"ranks must be integers, got dtype {ranks.dtype}")
    if int(pool_size) < 1:
        raise ValueError(f"pool_size must be >= 1, got {pool_size}")
    if ranks.min() < 1 or ranks.max() > pool_size:
        raise ValueError(
            f"ranks must lie in [1, pool_size={pool_size}], got min {ranks.min()} max {ranks.max()}"
        )
    ranks = ranks.astype(np.float64)
    metrics: dict[str, float | int | str] = {f"hits@{k}": recall_at_k(ranks, k) for k in ks}
    metrics.update(
        mrr=float(np.mean(1.0 / ranks)),
        mean_rank=float(np.mean(ranks)),
        median_rank=float(np.median(ranks)),
        num_queries=int(ranks.size),
        pool_size=int(pool_size),
        tie_policy=TIE_POLICY,
    )
    return metrics


def retrieval_metrics(
    scores: np.ndarray, gold: np.ndarray, *, ks: Iterable[int] = DEFAULT_KS
) -> dict[str, float | int | str]:
    """Ranks every query's gold candidate in a full score matrix and summarises the ranks.

    Args:
        scores: [Q, C] real scores, higher = more similar. NaN is rejected.
        gold: [Q] integer index of each query's gold candidate, in [0, C). Several queries may
            share one gold candidate.
        ks: cut-offs for 'hits@k'.

    Returns:
        The dict of `metrics_from_ranks` with pool_size = C.

    Raises:
        ValueError: on a wrong shape or dtype, an out-of-range gold index, or any NaN score.
    """
    ranks = ranks_from_scores(scores, gold)
    return metrics_from_ranks(ranks, ks=ks, pool_size=np.shape(scores)[1])


def _l2_normalize_rows(embeddings: np.ndarray, name: str) -> np.ndarray:
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


def ranks_from_embeddings(
    query_emb: np.ndarray, cand_emb: np.ndarray, gold: np.ndarray, *, chunk_size: int = 4096
) -> np.ndarray:
    """Gold ranks under cosine similarity, computed a chunk of queries at a time.

    Both sides are L2-normalised, then for each chunk of at most `chunk_size` queries the
    [chunk, C] float32 cosine matrix is formed and ranked with the `TIE_POLICY` rule. Peak extra
    memory is about 5 * chunk_size * C bytes (float32 scores plus a boolean mask), never Q * C.

    The gold score of query i is taken as element [i, gold[i]] of the chunk's own score matrix,
    not from a separate dot product, which could differ in the last bit from the matmul's value
    and turn an exact tie into a win or a loss.

    Args:
        query_emb: [Q, D] query embeddings (any float dtype, finite).
        cand_emb: [C, D] candidate embeddings (any float dtype, finite).
        gold: [Q] integer index of each query's gold candidate, in [0, C).
        chunk_size: number of queries scored per matmul.

    Returns:
        [Q] int64 ranks in [1, C].

    Raises:
        ValueError: on wrong shapes, mismatched embedding sizes, non-finite embeddings, an
            out-of-range gold index or a non-positive chunk_size.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    queries = _l2_normalize_rows(query_emb, "query_emb")  # [Q, D]
    candidates = _l2_normalize_rows(cand_emb, "cand_emb")  # [C, D]
    if queries.shape[1] != candidates.shape[1]:
        raise ValueError(
            f"query_emb and cand_emb must share the embedding size D, "
            f"got {queries.shape[1]} and {candidates.shape[1]}"
        )
    num_queries = queries.shape[0]
    gold = _check_gold(gold, num_queries, candidates.shape[0])
    candidates_t = np.ascontiguousarray(candidates.T)  # [D, C]
    ranks = np.empty(num_queries, dtype=np.int64)
    for start in range(0, num_queries, chunk_size):
        stop = min(start + chunk_size, num_queries)
        chunk_scores = queries[start:stop] @ candidates_t  # [chunk, C] float32
        ranks[start:stop] = _gold_ranks(chunk_scores, gold[start:stop])
    return ranks


def retrieval_metrics_from_embeddings(
    query_emb: np.ndarray,
    cand_emb: np.ndarray,
    gold: np.ndarray,
    *,
    chunk_size: int = 4096,
    ks: Iterable[int] = DEFAULT_KS,
) -> dict[str, float | int | str]:
    """Full-pool cosine retrieval metrics without materialising the [Q, C] score matrix.

    Equivalent to `retrieval_metrics(q_hat @ c_hat.T, gold, ks=ks)` with row-normalised float32
    embeddings q_hat, c_hat, for any chunk_size (see `ranks_from_embeddings`).

    Args:
        query_emb: [Q, D] query embeddings.
        cand_emb: [C, D] candidate embeddings.
        gold: [Q] integer index of each query's gold candidate, in [0, C).
        chunk_size: number of queries scored per matmul (memory ~ 5 * chunk_size * C bytes).
        ks: cut-offs for 'hits@k'.

    Returns:
        The dict of `metrics_from_ranks` with pool_size = C.
    """
    ranks = ranks_from_embeddings(query_emb, cand_emb, gold, chunk_size=chunk_size)
    return metrics_from_ranks(ranks, ks=ks, pool_size=np.shape(cand_emb)[0])


def inbatch_top1_accuracy(
    query_emb: np.ndarray, cand_emb: np.ndarray, *, batch_size: int = 64
) -> float:
    """MoMu's in-batch "Acc": top-1 cosine accuracy within consecutive batches of aligned pairs.

    Pair i is (query_emb[i], cand_emb[i]). The pairs are cut, in order, into batches
    [0, B), [B, 2B), ...; the last batch keeps the remainder (MoMu's drop_last=False). Inside a
    batch each query is scored against that batch's candidates only, and it counts as correct
    when its own candidate has rank 1 under `TIE_POLICY`. The result is

        accuracy = #correct / N          (averaged over all N queries, not over batches)

    so it depends on batch_size and on the order of the pairs.

    Args:
        query_emb: [N, D] query embeddings.
        cand_emb: [N, D] candidate embeddings aligned with the queries.
        batch_size: pairs per batch (MoMu uses 64).

    Returns:
        A Python float in [0, 1].

    Raises:
        ValueError: on mismatched or empty inputs, non-finite embeddings or batch_size < 1.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    queries = _l2_normalize_rows(query_emb, "query_emb")  # [N, D]
    candidates = _l2_normalize_rows(cand_emb, "cand_emb")  # [N, D]
    if queries.shape != candidates.shape:
        raise ValueError(
            "in-batch accuracy needs aligned pairs: query_emb and cand_emb must have the same "
            f"shape [N, D], got {queries.shape} and {candidates.shape}"
        )
    num_correct = 0
    for start in range(0, queries.shape[0], batch_size):
        stop = min(start + batch_size, queries.shape[0])
        batch_scores = queries[start:stop] @ candidates[start:stop].T  # [b, b] float32
        diagonal = np.arange(stop - start)  # pair i's own candidate is column i of its batch
        num_correct += int(np.count_nonzero(_gold_ranks(batch_scores, diagonal) == 1))
    return num_correct / queries.shape[0]
