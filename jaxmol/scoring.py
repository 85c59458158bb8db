"""Pure NumPy scoring of the retrieval protocols (no JAX): aligned-pair metrics in both
directions, MoMu's paragraph and sentence protocols.

Ranks and metrics follow `jaxmol.metrics`; this module adds what the protocols of
docs/evaluation.md build on top of them: both directions of an aligned split (text i <-> molecule
i), MoMu's sentence splitting and paragraph scores, and MoMu's in-batch accuracy fields.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from jaxmol import metrics as metrics_lib

MOMU_INBATCH_SIZE = 64
# The official fine-tuning evaluation shuffles the test pairs (unseeded) before cutting batches
# of 64; we shuffle with this recorded seed (None = file order, the earlier behaviour).
MOMU_SHUFFLE_SEED = 0
MOMU_RECALL_K = 20
# MoMu/CMTMR sentence splitting: pieces between '.' with fewer than this many space-separated
# fields are dropped (shortest first) while more than one piece remains.
MIN_SENTENCE_WORDS = 5


def both_directions(
    t2m: metrics_lib.RankCounts,
    m2t: metrics_lib.RankCounts,
    *,
    num_texts: int,
    num_molecules: int,
    ks: Sequence[int] = metrics_lib.DEFAULT_KS,
) -> dict:
    """Metric blocks of both directions from their tie-aware rank counts.

    Returns:
      {'t2m': metrics, 'm2t': metrics, 't2m_ranks': int64 [Q] optimistic ranks,
      't2m_num_tied': int64 [Q], and the same for 'm2t'}.
    """
    return {
        "t2m": metrics_lib.metrics_from_ranks(t2m, ks=ks, pool_size=num_molecules),
        "m2t": metrics_lib.metrics_from_ranks(m2t, ks=ks, pool_size=num_texts),
        "t2m_ranks": 1 + t2m.num_higher,
        "t2m_num_tied": t2m.num_tied,
        "m2t_ranks": 1 + m2t.num_higher,
        "m2t_num_tied": m2t.num_tied,
    }


def pool_metrics_from_embeddings(
    text_emb: np.ndarray, mol_emb: np.ndarray, *, ks: Sequence[int] = metrics_lib.DEFAULT_KS
) -> dict:
    """Full-pool metrics of aligned pairs (text i <-> molecule i), both directions, tie-aware.

    Returns:
      See `both_directions`.
    """
    gold = np.arange(len(text_emb))
    return both_directions(
        metrics_lib.rank_counts_from_embeddings(text_emb, mol_emb, gold),
        metrics_lib.rank_counts_from_embeddings(mol_emb, text_emb, gold),
        num_texts=len(text_emb),
        num_molecules=len(mol_emb),
        ks=ks,
    )


def _add_momu_fields(
    result: dict, t2m_inbatch: float, m2t_inbatch: float, inbatch_size: int, seed: int | None
) -> dict:
    for direction, accuracy in (("t2m", t2m_inbatch), ("m2t", m2t_inbatch)):
        block = result[direction]
        block[f"inbatch_acc@{inbatch_size}"] = accuracy
        block["inbatch_size"] = inbatch_size
        block["inbatch_shuffle_seed"] = seed  # None: batches cut in file order
        block[f"recall@{MOMU_RECALL_K}"] = block[f"hits@{MOMU_RECALL_K}"]
    return result


def momu_metrics_from_embeddings(
    text_emb: np.ndarray,
    mol_emb: np.ndarray,
    *,
    inbatch_size: int = MOMU_INBATCH_SIZE,
    shuffle_seed: int | None = MOMU_SHUFFLE_SEED,
) -> dict:
    """MoMu's paragraph protocol on aligned pairs (text i <-> molecule i).

    Each direction gets the full-pool metrics of `pool_metrics_from_embeddings`, plus
    'inbatch_acc@<inbatch_size>' (top-1 inside batches of the pairs shuffled with
    `shuffle_seed`, as the official fine-tuning evaluation does; None = file order),
    'inbatch_shuffle_seed' and 'recall@20' (= hits@20 of the full pool).
    """
    result = pool_metrics_from_embeddings(text_emb, mol_emb)
    accuracy = functools.partial(
        metrics_lib.inbatch_top1_accuracy, batch_size=inbatch_size, shuffle_seed=shuffle_seed
    )
    return _add_momu_fields(
        result,
        accuracy(text_emb, mol_emb),
        accuracy(mol_emb, text_emb),
        inbatch_size,
        shuffle_seed,
    )


def split_sentences(paragraph: str) -> list[str]:
    """Splits a paragraph into sentences as MoMu / CMTMR do for PCdes sentence level.

    The paragraph is cut at every '.'; a piece with fewer than `MIN_SENTENCE_WORDS` fields of
    ``piece.split(' ')`` (so a leading space counts as a field, exactly as the official code
    counts) is dropped, shortest first, while more than one piece remains. Kept pieces are
    stripped of surrounding whitespace; a paragraph whose only remaining piece is blank keeps
    the whole paragraph.

    Args:
      paragraph: one description.

    Returns:
      The kept sentences in paragraph order (at least one).
    """
    pieces = paragraph.split(".")
    short = sorted(
        (piece for piece in pieces if len(piece.split(" ")) < MIN_SENTENCE_WORDS), key=len
    )
    for piece in short:
        if len(pieces) > 1:
            pieces.remove(piece)
    sentences = [piece.strip() for piece in pieces if piece.strip()]
    return sentences or [paragraph.strip()]


def sentence_paragraph_scores(
    sentence_emb: np.ndarray, sentence_paragraph: np.ndarray, mol_emb: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Paragraph–molecule scores = the mean cosine over the paragraph's sentences.

    The mean of cosines equals the dot product of the *mean unit sentence vector* with the unit
    molecule vector, so the [P, M] matrix is one matmul.

    Args:
      sentence_emb: [S, d] sentence embeddings.
      sentence_paragraph: int [S], the paragraph (0..P-1) of each sentence; every paragraph has
        at least one sentence.
      mol_emb: [M, d] molecule embeddings.

    Returns:
      paragraph_emb float32 [P, d] (mean unit sentence vectors, not renormalised) and
      scores float32 [P, M].
    """
    sentence_paragraph = np.asarray(sentence_paragraph, np.int64)
    num_paragraphs = int(sentence_paragraph.max()) + 1 if len(sentence_paragraph) else 0
    counts = np.bincount(sentence_paragraph, minlength=num_paragraphs)  # [P]
    if (counts == 0).any():
        raise ValueError(f"paragraphs without sentences: {np.flatnonzero(counts == 0)[:5]}")
    sums = np.zeros((num_paragraphs, sentence_emb.shape[1]), np.float64)  # [P, d]
    np.add.at(
        sums,
        sentence_paragraph,
        metrics_lib.l2_normalize_rows(sentence_emb, "sentence_emb").astype(np.float64),
    )
    paragraph_emb = (sums / counts[:, None]).astype(np.float32)  # [P, d]
    return paragraph_emb, paragraph_emb @ metrics_lib.l2_normalize_rows(mol_emb, "mol_emb").T


def momu_metrics_from_scores(
    scores: np.ndarray,
    *,
    inbatch_size: int = MOMU_INBATCH_SIZE,
    shuffle_seed: int | None = MOMU_SHUFFLE_SEED,
) -> dict:
    """MoMu's metrics from an [N, N] text–molecule score matrix of aligned pairs (text i,
    molecule i); 't2m' ranks the rows' molecules, 'm2t' the columns' texts."""
    gold = np.arange(scores.shape[0])
    result = both_directions(
        metrics_lib.rank_counts_from_scores(scores, gold),
        metrics_lib.rank_counts_from_scores(scores.T, gold),
        num_texts=scores.shape[0],
        num_molecules=scores.shape[1],
    )
    accuracy = functools.partial(
        metrics_lib.inbatch_top1_accuracy_from_scores,
        batch_size=inbatch_size,
        shuffle_seed=shuffle_seed,
    )
    return _add_momu_fields(
        result, accuracy(scores), accuracy(scores.T), inbatch_size, shuffle_seed
    )
