"""Retrieval evaluation: batched embedding of whole splits, four protocols, result files.

Embedding runs one jit-compiled eval-mode forward per batch shape over all devices of a
`DataParallel` runner (the variables replicated, the last batch padded and masked). Texts and
molecules are embedded separately (the model's text-only and molecule-only paths), so a
molecule-only split (ChEBI-20 train molecules) or a list of sentences can be embedded as well.
Scores are cosine similarities and ranks follow `jaxmol.metrics` (rank = 1 + number of
candidates scoring strictly higher than the gold one, `metrics.TIE_POLICY`).

Protocols (see docs/evaluation.md):

* ``pool``: every text of the split ranks every molecule of the split, and vice versa.
* ``text2mol``: ChEBI-20, Text2Mol's protocol: texts of the split rank the molecules of every
  ChEBI-20 split (train + validation + test, deduplicated by CID); molecules of the split rank
  the texts of every ChEBI-20 split that has texts.
* ``momu``: MoMu's paragraph protocol on PCdes: top-1 accuracy inside consecutive batches of 64,
  plus the full-split ranking metrics (Recall@20 among them).
* ``momu_sentence``: the same metrics with a paragraph's score = the mean cosine over its
  sentences.

Pairs whose molecule cannot be featurised are excluded from queries and candidates and listed in
the result's ``skipped``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxmol import metrics as metrics_lib
from jaxmol.data import batching, datasets
from jaxmol.data.featurize import FeaturizedSplit, featurize_split
from jaxmol.data.tokenize import TokenizedTexts, Tokenizer, tokenize_texts
from jaxmol.parallel import DataParallel

logger = logging.getLogger(__name__)

PROTOCOLS = ("pool", "text2mol", "momu", "momu_sentence")
TEXT2MOL_QUERY_SPLITS = ("chebi20/validation", "chebi20/test")
# Candidate molecules of the text2mol protocol: every ChEBI-20 molecule (33,009).
TEXT2MOL_MOLECULE_SPLITS = ("chebi20/train_molecules", "chebi20/validation", "chebi20/test")
# Candidate texts: every ChEBI-20 split with texts; 'chebi20/train' only when its file exists.
TEXT2MOL_TEXT_SPLITS = ("chebi20/train", "chebi20/validation", "chebi20/test")
TEXT2MOL_KS = (1, 5, 10, 20, 100, 500, 1000)
MOMU_INBATCH_SIZE = 64
MOMU_RECALL_K = 20
# MoMu/CMTMR sentence splitting: pieces between '.' with fewer than this many space-separated
# fields are dropped (shortest first) while more than one piece remains.
MIN_SENTENCE_WORDS = 5


class ProtocolError(ValueError):
    """A protocol that cannot run on the requested split (or an unknown protocol)."""


def check_protocol(split_name: str, protocol: str) -> None:
    """Raises `ProtocolError` for an unknown protocol or a split it does not apply to."""
    if protocol not in PROTOCOLS:
        raise ProtocolError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    if protocol == "text2mol" and split_name not in TEXT2MOL_QUERY_SPLITS:
        raise ProtocolError(
            f"the text2mol protocol ranks against every ChEBI-20 split; its query split must be "
            f"one of {TEXT2MOL_QUERY_SPLITS}, got {split_name!r}"
        )


def eval_variables(state: Any) -> dict:
    """The variables an eval forward needs (no optimiser state)."""
    return {"params": state.params, "batch_stats": state.batch_stats}


def result_stem(split_name: str, protocol: str) -> str:
    """File stem of a result: ``<split with '/' and ':' as '_'>__<protocol>``."""
    return f"{split_name.replace('/', '_').replace(':', '_')}__{protocol}"


# ----------------------------------------------------------------------------------------------
# Tokenising and featurising.


@dataclasses.dataclass(frozen=True)
class SplitEncoder:
    """Tokenises texts and featurises molecules the way a trained model expects.

    Calling it on a `PairDataset` gives the `EncodedSplit` of its pairs (as
    `batching.encode_split`); `molecules` and `texts` do one modality alone.

    Attributes:
      tokenizer: the run's tokenizer (its max length is the run's).
      featurizer: 'ogb' (GIN) or 'mol2vec' (official GCN).
      cache_dir: the feature cache (None: the default one).
    """

    tokenizer: Tokenizer
    featurizer: str = "ogb"
    cache_dir: str | None = None

    @classmethod
    def from_config(cls, config) -> SplitEncoder:
        """The encoder of a run config (a resolved `ml_collections.ConfigDict`)."""
        from jaxmol.data.tokenize import load_tokenizer
        from jaxmol.train_lib import text_model_dir

        tokenizer = load_tokenizer(text_model_dir(config), max_length=config.data.max_text_length)
        featurizer = "ogb" if config.model.mol_encoder == "gin" else "mol2vec"
        return cls(tokenizer, featurizer, config.data.cache_dir or None)

    def __call__(self, dataset: datasets.PairDataset) -> batching.EncodedSplit:
        return batching.encode_split(
            dataset,
            self.tokenizer,
            featurizer=self.featurizer,
            on_invalid="skip",
            cache_dir=self.cache_dir,
        )

    def molecules(self, dataset: datasets.PairDataset) -> FeaturizedSplit:
        return featurize_split(
            dataset.ids,
            dataset.smiles,
            featurizer=self.featurizer,
            on_invalid="skip",
            cache_dir=self.cache_dir,
        )

    def texts(self, texts: Sequence[str], ids: Sequence[str] | None = None) -> TokenizedTexts:
        return tokenize_texts(self.tokenizer, texts, ids=ids)


def _as_split_encoder(encode) -> SplitEncoder | None:
    """`encode` as a `SplitEncoder`: itself, or rebuilt from a partial of `encode_split`."""
    if isinstance(encode, SplitEncoder):
        return encode
    if isinstance(encode, functools.partial) and encode.func is batching.encode_split:
        keywords = encode.keywords
        return SplitEncoder(
            keywords["tokenizer"], keywords.get("featurizer", "ogb"), keywords.get("cache_dir")
        )
    return None


# ----------------------------------------------------------------------------------------------
# Embedding.


@dataclasses.dataclass(frozen=True)
class ReplicatedVariables:
    """Variables already laid out for the runner (see `Embedder.replicate`)."""

    tree: Any


class Embedder:
    """Embeds texts and molecules with a model in eval mode over all devices of a runner.

    Every method takes the variables either as one copy ({'params', 'batch_stats'} on any
    device) or as `ReplicatedVariables` from `replicate` (to replicate once for many calls).

    Args:
      model: a `RetrievalModel` whose config has ``axis_name=None`` (eval BatchNorm uses running
        statistics, so no collectives are needed and rows never interact).
      runner: the `DataParallel` runner; each batch is split over its devices.
    """

    def __init__(self, model, runner: DataParallel):
        self.model = model
        self.runner = runner
        self.embed_dim = int(model.config.embed_dim)

        def text_fn(variables, text_ids, text_mask):
            z_txt, _, _ = model.apply(
                variables, text_ids, text_mask, train=False, method="embed_text"
            )
            return (z_txt,)  # [b, d]

        def molecule_fn(variables, graphs):
            z_mol, _, _ = model.apply(variables, graphs, train=False, method="embed_molecules")
            return (z_mol,)  # [b, d]

        self._text_fn = runner.run(text_fn, replicated_args=(0,), out_kinds=("sharded",))
        self._molecule_fn = runner.run(molecule_fn, replicated_args=(0,), out_kinds=("sharded",))

    def replicate(self, variables: Any) -> ReplicatedVariables:
        """Copies one set of variables to every device of the runner (once)."""
        if isinstance(variables, ReplicatedVariables):
            return variables
        return ReplicatedVariables(self.runner.replicate(variables))

    def global_batch_size(self, batch_size: int) -> int:
        """`batch_size` rounded up to a multiple of the device count."""
        num_devices = self.runner.num_devices
        return -(-max(int(batch_size), 1) // num_devices) * num_devices

    def embed_texts(
        self,
        variables: Any,
        tokens: TokenizedTexts,
        rows: np.ndarray | None = None,
        *,
        batch_size: int,
    ) -> np.ndarray:
        """Embeds texts `rows` of `tokens` (default all).

        Texts are batched in order of length (far less padding; rows never interact in eval
        mode), each batch padded to the smallest length bucket that fits it; padded rows have an
        all-zero mask and are dropped.

        Returns:
          float32 [len(rows), d]; row i embeds text rows[i].
        """
        rows = np.arange(len(tokens)) if rows is None else np.asarray(rows, np.int64)
        out = np.zeros((len(rows), self.embed_dim), np.float32)
        if len(rows) == 0:
            return out
        replicated = self.replicate(variables).tree
        B = self.global_batch_size(batch_size)
        D = self.runner.num_devices
        buckets = _text_buckets(tokens.max_length)
        order = np.argsort(tokens.lengths[rows], kind="stable")  # [n] positions, short first

        def host_batches() -> Iterator[tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]]:
            for start in range(0, len(rows), B):
                positions = order[start : start + B]  # [n_b] output positions
                lengths = tokens.lengths[rows[positions]]
                L = batching.text_bucket(int(lengths.max()), buckets)
                text_ids = np.full((B, L), tokens.pad_id, np.int32)  # [B, L]
                text_mask = np.zeros((B, L), np.int32)  # [B, L], zero rows = padded texts
                for i, row in enumerate(rows[positions]):
                    ids = tokens.text(row)
                    text_ids[i, : len(ids)] = ids
                    text_mask[i, : len(ids)] = 1
                yield positions, (text_ids.reshape(D, B // D, L), text_mask.reshape(D, B // D, L))

        for positions, z in self._stream(
            host_batches(), lambda x: self._text_fn(replicated, *self.runner.shard(x))
        ):
            out[positions] = z[: len(positions)]  # padded rows come last
        return out

    def embed_molecules(
        self,
        variables: Any,
        graphs: FeaturizedSplit,
        rows: np.ndarray | None = None,
        *,
        batch_size: int,
    ) -> np.ndarray:
        """Embeds molecules `rows` of `graphs` (default every valid one).

        Graphs are packed by `batching.PairBatcher` (static node/edge budgets, per-device
        chunks, ``pair_mask`` False on the padded slots of the last batch).

        Returns:
          float32 [len(rows), d]; row i embeds molecule rows[i].
        """
        rows = np.flatnonzero(graphs.valid) if rows is None else np.asarray(rows, np.int64)
        out = np.zeros((len(rows), self.embed_dim), np.float32)
        if len(rows) == 0:
            return out
        if not graphs.valid[rows].all():
            raise ValueError("embed_molecules got rows of molecules that failed featurisation")
        replicated = self.replicate(variables).tree
        batcher = batching.PairBatcher(
            _molecule_only_split(graphs, rows),
            batch_size=self.global_batch_size(batch_size),
            num_devices=self.runner.num_devices,
            shuffle=False,
            text_buckets=(1,),
        )

        def host_batches() -> Iterator[tuple[np.ndarray, Any]]:
            cursor = 0
            for batch_rows in batcher.epoch_batches(0):
                batch = batcher.make_batch(batch_rows)
                # Output positions of the real slots, in the batch's row-major order.
                real = batch["pair_mask"].reshape(-1)  # [B]
                positions = np.full(real.shape, -1, np.int64)
                positions[real] = np.arange(cursor, cursor + len(batch_rows))
                cursor += len(batch_rows)
                yield positions, batch["graphs"]

        for positions, z in self._stream(
            host_batches(), lambda g: self._molecule_fn(replicated, self.runner.shard(g))
        ):
            real = positions >= 0
            out[positions[real]] = z[real]
        return out

    def embed_split(
        self, variables: Any, split: batching.EncodedSplit, *, batch_size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embeds the text and the molecule of every batchable pair of `split`.

        Returns:
          text_emb float32 [M', d] and mol_emb float32 [M', d]; row i is pair split.rows[i].
        """
        replicated = self.replicate(variables)
        text_emb = self.embed_texts(replicated, split.tokens, split.rows, batch_size=batch_size)
        mol_emb = self.embed_molecules(replicated, split.graphs, split.rows, batch_size=batch_size)
        return text_emb, mol_emb

    def _stream(self, host_batches: Iterator, run) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Runs `run` on each host batch (built one ahead in a thread) and yields
        (positions, host embeddings [B, d]); one batch stays in flight while the previous one
        is copied back."""
        in_flight: collections.deque = collections.deque()
        for positions, host_batch in batching.prefetch(host_batches, size=2):
            (z,) = run(host_batch)  # [D, b, d]
            in_flight.append((positions, z))
            if len(in_flight) > 1:
                yield self._fetch(*in_flight.popleft())
        while in_flight:
            yield self._fetch(*in_flight.popleft())

    def _fetch(self, positions, z) -> tuple[np.ndarray, np.ndarray]:
        return positions, np.asarray(z).reshape(-1, self.embed_dim)


def _text_buckets(max_length: int) -> tuple[int, ...]:
    buckets = [b for b in batching.DEFAULT_TEXT_BUCKETS if b < max_length]
    return (*buckets, max_length)


def _molecule_only_split(graphs: FeaturizedSplit, rows: np.ndarray) -> batching.EncodedSplit:
    """An `EncodedSplit` over `graphs` whose texts are one placeholder token each, so that
    `PairBatcher` packs the graphs; the text arrays it builds are never used."""
    count = len(graphs)
    placeholder = TokenizedTexts(
        token_ids=np.zeros(count, np.int32),
        offsets=np.arange(count + 1, dtype=np.int64),
        num_truncated=0,
        max_length=1,
    )
    names = tuple(str(i) for i in range(count))
    dataset = datasets.PairDataset("molecules", names, names, None)
    return batching.EncodedSplit(dataset, placeholder, graphs, np.asarray(rows, np.int64))


# ----------------------------------------------------------------------------------------------
# Metrics from embeddings or scores (no model).


def pool_metrics_from_embeddings(
    text_emb: np.ndarray, mol_emb: np.ndarray, *, ks: Sequence[int] = metrics_lib.DEFAULT_KS
) -> dict:
    """Full-pool metrics of aligned pairs (text i <-> molecule i), both directions.

    Returns:
      {'t2m': metrics, 'm2t': metrics, 't2m_ranks': int64 [N], 'm2t_ranks': int64 [N]}.
    """
    gold = np.arange(len(text_emb))
    t2m_ranks = metrics_lib.ranks_from_embeddings(text_emb, mol_emb, gold)
    m2t_ranks = metrics_lib.ranks_from_embeddings(mol_emb, text_emb, gold)
    return {
        "t2m": metrics_lib.metrics_from_ranks(t2m_ranks, ks=ks, pool_size=len(mol_emb)),
        "m2t": metrics_lib.metrics_from_ranks(m2t_ranks, ks=ks, pool_size=len(text_emb)),
        "t2m_ranks": t2m_ranks,
        "m2t_ranks": m2t_ranks,
    }


def _add_momu_fields(result: dict, t2m_inbatch: float, m2t_inbatch: float, inbatch_size: int):
    for direction, accuracy in (("t2m", t2m_inbatch), ("m2t", m2t_inbatch)):
        block = result[direction]
        block[f"inbatch_acc@{inbatch_size}"] = accuracy
        block["inbatch_size"] = inbatch_size
        block[f"recall@{MOMU_RECALL_K}"] = block[f"hits@{MOMU_RECALL_K}"]
    return result


def momu_metrics_from_embeddings(
    text_emb: np.ndarray, mol_emb: np.ndarray, *, inbatch_size: int = MOMU_INBATCH_SIZE
) -> dict:
    """MoMu's paragraph protocol on aligned pairs (text i <-> molecule i).

    Each direction gets the full-pool metrics of `pool_metrics_from_embeddings`, plus
    'inbatch_acc@<inbatch_size>' (top-1 inside consecutive batches of the pair order) and
    'recall@20' (= hits@20 of the full pool).
    """
    result = pool_metrics_from_embeddings(text_emb, mol_emb)
    return _add_momu_fields(
        result,
        metrics_lib.inbatch_top1_accuracy(text_emb, mol_emb, batch_size=inbatch_size),
        metrics_lib.inbatch_top1_accuracy(mol_emb, text_emb, batch_size=inbatch_size),
        inbatch_size,
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


def _unit_rows(embeddings: np.ndarray) -> np.ndarray:
    """Rows at unit L2 norm (float64 division, float32 result, as `jaxmol.metrics`)."""
    embeddings = np.asarray(embeddings, np.float64)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)  # [N, 1]
    return (embeddings / np.maximum(norms, 1e-12)).astype(np.float32)


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
    np.add.at(sums, sentence_paragraph, _unit_rows(sentence_emb).astype(np.float64))
    paragraph_emb = (sums / counts[:, None]).astype(np.float32)  # [P, d]
    return paragraph_emb, paragraph_emb @ _unit_rows(mol_emb).T


def inbatch_top1_accuracy_from_scores(scores: np.ndarray, *, batch_size: int) -> float:
    """`metrics.inbatch_top1_accuracy` on a precomputed [N, N] score matrix of aligned pairs:
    row i's query counts as correct when column i ranks first inside its batch's block."""
    num_correct = 0
    for start in range(0, scores.shape[0], batch_size):
        stop = min(start + batch_size, scores.shape[0])
        block = scores[start:stop, start:stop]  # [b, b]
        ranks = metrics_lib.ranks_from_scores(block, np.arange(stop - start))
        num_correct += int(np.count_nonzero(ranks == 1))
    return num_correct / scores.shape[0]


def momu_metrics_from_scores(scores: np.ndarray, *, inbatch_size: int = MOMU_INBATCH_SIZE) -> dict:
    """MoMu's metrics from an [N, N] text–molecule score matrix of aligned pairs (text i,
    molecule i); 't2m' ranks the rows' molecules, 'm2t' the columns' texts."""
    gold = np.arange(scores.shape[0])
    t2m_ranks = metrics_lib.ranks_from_scores(scores, gold)
    m2t_ranks = metrics_lib.ranks_from_scores(scores.T, gold)
    result = {
        "t2m": metrics_lib.metrics_from_ranks(t2m_ranks, pool_size=scores.shape[1]),
        "m2t": metrics_lib.metrics_from_ranks(m2t_ranks, pool_size=scores.shape[0]),
        "t2m_ranks": t2m_ranks,
        "m2t_ranks": m2t_ranks,
    }
    return _add_momu_fields(
        result,
        inbatch_top1_accuracy_from_scores(scores, batch_size=inbatch_size),
        inbatch_top1_accuracy_from_scores(scores.T, batch_size=inbatch_size),
        inbatch_size,
    )


# ----------------------------------------------------------------------------------------------
# Protocols.


def pool_metrics(
    embedder: Embedder, variables: Any, split: batching.EncodedSplit, *, batch_size: int
) -> dict:
    """The pool protocol: every text of the split ranks all its molecules, and vice versa.

    Returns:
      {'t2m', 'm2t'} metrics, their ranks and 'text_emb', 'mol_emb' [M', d] (row i = pair
      split.rows[i]).
    """
    text_emb, mol_emb = embedder.embed_split(variables, split, batch_size=batch_size)
    return {
        **pool_metrics_from_embeddings(text_emb, mol_emb),
        "text_emb": text_emb,
        "mol_emb": mol_emb,
    }


def _load(split_name: str, max_pairs: int) -> datasets.PairDataset:
    dataset = datasets.load_split(split_name)
    if max_pairs > 0:
        dataset = dataset.select(range(min(max_pairs, len(dataset))))
    return dataset


def _skipped(split_name: str, failures) -> list[dict]:
    return [{"split": split_name, "id": i, "smiles": s, "reason": r} for i, s, r in failures]


def _encode_pairs(split_name: str, encoder, max_pairs: int) -> batching.EncodedSplit:
    dataset = _load(split_name, max_pairs)
    if dataset.texts is None:
        raise ProtocolError(f"{split_name} has no texts; it cannot be a query split")
    split = encoder(dataset)
    if len(split.rows) == 0:
        raise ProtocolError(f"{split_name}: no molecule could be featurised")
    return split


def _run_aligned(embedder, variables, split_name, encode, batch_size, max_pairs, protocol, inbatch):
    """pool and momu: queries and candidates are the split's own pairs."""
    split = _encode_pairs(split_name, encode, max_pairs)
    text_emb, mol_emb = embedder.embed_split(variables, split, batch_size=batch_size)
    if protocol == "momu":
        result = momu_metrics_from_embeddings(text_emb, mol_emb, inbatch_size=inbatch)
    else:
        result = pool_metrics_from_embeddings(text_emb, mol_emb)
    ids = np.asarray([split.dataset.ids[r] for r in split.rows])
    fields = {
        "num_pairs": len(split.dataset),
        "t2m_pool_splits": [split_name],
        "m2t_pool_splits": [split_name],
        "skipped": _skipped(split_name, split.skipped),
    }
    arrays = {
        "query_ids": ids,
        "text_ids": ids,
        "text_emb": text_emb,
        "mol_ids": ids,
        "mol_emb": mol_emb,
    }
    return result, fields, arrays


def _run_momu_sentence(embedder, variables, split_name, encoder, batch_size, max_pairs, inbatch):
    split = _encode_pairs(split_name, encoder, max_pairs)
    replicated = embedder.replicate(variables)
    texts = split.dataset.texts
    ids = [split.dataset.ids[r] for r in split.rows]
    sentences, sentence_paragraph = [], []
    for paragraph, row in enumerate(split.rows):
        kept = split_sentences(texts[row])
        sentences.extend(kept)
        sentence_paragraph.extend([paragraph] * len(kept))
    sentence_ids = [f"{ids[p]}#{k}" for p, k in _enumerate_within(sentence_paragraph)]
    tokens = encoder.texts(sentences, ids=sentence_ids)
    sentence_emb = embedder.embed_texts(replicated, tokens, batch_size=batch_size)  # [S, d]
    mol_emb = embedder.embed_molecules(replicated, split.graphs, split.rows, batch_size=batch_size)
    sentence_paragraph = np.asarray(sentence_paragraph, np.int64)
    paragraph_emb, scores = sentence_paragraph_scores(sentence_emb, sentence_paragraph, mol_emb)
    result = momu_metrics_from_scores(scores, inbatch_size=inbatch)
    ids = np.asarray(ids)
    fields = {
        "num_pairs": len(split.dataset),
        "num_sentences": len(sentences),
        "t2m_pool_splits": [split_name],
        "m2t_pool_splits": [split_name],
        "skipped": _skipped(split_name, split.skipped),
    }
    arrays = {
        "query_ids": ids,
        "text_ids": ids,
        "text_emb": paragraph_emb,
        "mol_ids": ids,
        "mol_emb": mol_emb,
        "sentence_emb": sentence_emb,
        "sentence_paragraph": sentence_paragraph,
    }
    return result, fields, arrays


def _enumerate_within(groups: Sequence[int]) -> Iterator[tuple[int, int]]:
    """(group, index within the group) for a sequence of group labels."""
    seen: collections.Counter = collections.Counter()
    for group in groups:
        yield group, seen[group]
        seen[group] += 1


def text2mol_text_splits() -> tuple[str, ...]:
    """The ChEBI-20 splits whose texts are available (train only when its file is present)."""
    have_train = (datasets.DATA_DIR / "chebi20" / "train.txt").is_file()
    return tuple(s for s in TEXT2MOL_TEXT_SPLITS if s != "chebi20/train" or have_train)


def _run_text2mol(embedder, variables, split_name, encoder, batch_size, max_pairs):
    replicated = embedder.replicate(variables)
    text_splits = text2mol_text_splits()
    loaded: dict[str, tuple[datasets.PairDataset, FeaturizedSplit]] = {}
    for name in dict.fromkeys((*TEXT2MOL_MOLECULE_SPLITS, *text_splits)):
        dataset = _load(name, max_pairs)
        loaded[name] = (dataset, encoder.molecules(dataset))

    def pool(names: Sequence[str]) -> list[tuple[str, np.ndarray]]:
        """Per split, the valid rows whose id is new to the pool (first occurrence wins)."""
        seen: set[str] = set()
        chosen = []
        for name in names:
            dataset, graphs = loaded[name]
            rows = [r for r in np.flatnonzero(graphs.valid) if dataset.ids[r] not in seen]
            seen.update(dataset.ids[r] for r in rows)
            chosen.append((name, np.asarray(rows, np.int64)))
        return chosen

    mol_ids, mol_split, mol_blocks = [], [], []
    for name, rows in pool(TEXT2MOL_MOLECULE_SPLITS):
        dataset, graphs = loaded[name]
        mol_blocks.append(embedder.embed_molecules(replicated, graphs, rows, batch_size=batch_size))
        mol_ids += [dataset.ids[r] for r in rows]
        mol_split += [name] * len(rows)
    text_ids, text_split, text_blocks = [], [], []
    for name, rows in pool(text_splits):
        dataset, _ = loaded[name]
        tokens = encoder.texts(dataset.texts, ids=dataset.ids)
        text_blocks.append(embedder.embed_texts(replicated, tokens, rows, batch_size=batch_size))
        text_ids += [dataset.ids[r] for r in rows]
        text_split += [name] * len(rows)
    mol_emb, text_emb = np.concatenate(mol_blocks), np.concatenate(text_blocks)

    query_dataset, query_graphs = loaded[split_name]
    query_ids = [query_dataset.ids[r] for r in np.flatnonzero(query_graphs.valid)]
    if not query_ids:
        raise ProtocolError(f"{split_name}: no molecule could be featurised")
    mol_index = {identifier: i for i, identifier in enumerate(mol_ids)}
    text_index = {identifier: i for i, identifier in enumerate(text_ids)}
    query_in_mols = np.asarray([mol_index[i] for i in query_ids])  # [Q] gold of t2m
    query_in_texts = np.asarray([text_index[i] for i in query_ids])  # [Q] gold of m2t
    t2m_ranks = metrics_lib.ranks_from_embeddings(text_emb[query_in_texts], mol_emb, query_in_mols)
    m2t_ranks = metrics_lib.ranks_from_embeddings(mol_emb[query_in_mols], text_emb, query_in_texts)
    result = {
        "t2m": metrics_lib.metrics_from_ranks(t2m_ranks, ks=TEXT2MOL_KS, pool_size=len(mol_ids)),
        "m2t": metrics_lib.metrics_from_ranks(m2t_ranks, ks=TEXT2MOL_KS, pool_size=len(text_ids)),
        "t2m_ranks": t2m_ranks,
        "m2t_ranks": m2t_ranks,
    }
    skipped = []
    for name, (_, graphs) in loaded.items():
        skipped += _skipped(name, graphs.failures)
    fields = {
        "num_pairs": len(query_dataset),
        "t2m_pool_splits": list(TEXT2MOL_MOLECULE_SPLITS),
        "m2t_pool_splits": list(text_splits),
        "m2t_missing_splits": [s for s in TEXT2MOL_TEXT_SPLITS if s not in text_splits],
        "skipped": skipped,
    }
    arrays = {
        "query_ids": np.asarray(query_ids),
        "text_ids": np.asarray(text_ids),
        "text_split": np.asarray(text_split),
        "text_emb": text_emb,
        "mol_ids": np.asarray(mol_ids),
        "mol_split": np.asarray(mol_split),
        "mol_emb": mol_emb,
    }
    return result, fields, arrays


def evaluate_split(
    embedder: Embedder,
    variables: Any,
    split_name: str,
    *,
    protocol: str = "pool",
    encode,
    batch_size: int,
    workdir: str | Path | None,
    checkpoint_step: int,
    max_pairs: int = -1,
    inbatch_size: int = MOMU_INBATCH_SIZE,
) -> dict:
    """Evaluates one split with one protocol and writes its result files.

    Args:
      embedder: the `Embedder` (model + runner).
      variables: {'params', 'batch_stats'} (one copy) or `ReplicatedVariables`.
      split_name: a `datasets.load_split` name.
      protocol: one of `PROTOCOLS`.
      encode: a `SplitEncoder` (or a partial of `batching.encode_split`, enough for 'pool' and
        'momu').
      batch_size: pairs per embedding batch (rounded up to a multiple of the device count).
      workdir: results go to ``workdir/eval/<stem>.json`` and ``.npz`` (None: not written).
      checkpoint_step: recorded in the result.
      max_pairs: > 0 uses only the first N rows of every split involved (smoke tests).
      inbatch_size: the batch of MoMu's in-batch accuracy.

    Returns:
      The JSON report: 't2m' and 'm2t' metric blocks, 'split', 'protocol', 'checkpoint_step',
      'tie_policy', 't2m_pool_splits', 'm2t_pool_splits', 'skipped' (every excluded pair with
      its split, id, SMILES and reason), 'num_skipped', 'num_pairs', 'max_pairs', 'files'.

    Raises:
      ProtocolError: unknown protocol, or a split the protocol does not apply to.
      jaxmol.data.datasets.DataError: unknown split or bad data file.
    """
    check_protocol(split_name, protocol)
    encoder = _as_split_encoder(encode)
    if encoder is None and protocol in ("text2mol", "momu_sentence"):
        raise ProtocolError(f"the {protocol} protocol needs encode=SplitEncoder(...)")
    start = time.perf_counter()
    replicated = embedder.replicate(variables)
    if protocol in ("pool", "momu"):
        run = (replicated, split_name, encoder or encode, batch_size, max_pairs, protocol)
        result, fields, arrays = _run_aligned(embedder, *run, inbatch_size)
    elif protocol == "momu_sentence":
        run = (replicated, split_name, encoder, batch_size, max_pairs, inbatch_size)
        result, fields, arrays = _run_momu_sentence(embedder, *run)
    else:
        run = (replicated, split_name, encoder, batch_size, max_pairs)
        result, fields, arrays = _run_text2mol(embedder, *run)
    logger.info("%s (%s) evaluated in %.1f s", split_name, protocol, time.perf_counter() - start)
    report = {
        "split": split_name,
        "protocol": protocol,
        "checkpoint_step": int(checkpoint_step),
        "tie_policy": metrics_lib.TIE_POLICY,
        "t2m": result["t2m"],
        "m2t": result["m2t"],
        **fields,
        "num_skipped": len(fields["skipped"]),
        "max_pairs": int(max_pairs),
    }
    if workdir is not None:
        out_dir = Path(workdir) / "eval"
        stem = result_stem(split_name, protocol)
        report["files"] = {"json": f"eval/{stem}.json", "npz": f"eval/{stem}.npz"}
        from jaxmol.checkpointing import write_json

        out_dir.mkdir(parents=True, exist_ok=True)
        np.savez(
            out_dir / f"{stem}.npz",
            **arrays,
            t2m_ranks=result["t2m_ranks"],
            m2t_ranks=result["m2t_ranks"],
        )
        write_json(out_dir / f"{stem}.json", report)
    return report


def evaluate_checkpoint(
    workdir: str | Path,
    split_name: str,
    *,
    protocol: str = "pool",
    step: int | str = "best",
    batch_size: int = 0,
    num_devices: int = -1,
    parallel: str = "shard_map",
    max_pairs: int = -1,
    inbatch_size: int = MOMU_INBATCH_SIZE,
) -> dict:
    """Restores a training workdir's model (no optimiser state) and evaluates one split.

    The variables are restored onto one device, whatever the training device count, then
    replicated over the `num_devices` devices used for embedding.

    Args:
      workdir: a training workdir (with ``checkpoints/``); results go to its ``eval/``.
      split_name, protocol, max_pairs, inbatch_size: as `evaluate_split`.
      step: 'best', 'latest' or a step number.
      batch_size: embedding batch; <= 0 uses the run's ``eval_batch_size``.
      num_devices: devices to embed on (-1: all local devices).
      parallel: 'shard_map' or 'pmap'.

    Returns:
      The report of `evaluate_split`.

    Raises:
      jaxmol.checkpointing.CheckpointError: no workdir, no checkpoint, or an unreadable one.
      ProtocolError, jaxmol.data.datasets.DataError: as `evaluate_split` (checked before the
        model is restored).
    """
    from jaxmol import checkpointing
    from jaxmol.parallel import select_devices

    check_protocol(split_name, protocol)
    datasets.load_split(split_name)  # a bad split name fails before the (slow) restore
    model, variables, config, restored_step = checkpointing.restore_for_eval(workdir, step)
    runner = DataParallel(parallel, select_devices(num_devices))
    embedder = Embedder(model, runner)
    return evaluate_split(
        embedder,
        variables,
        split_name,
        protocol=protocol,
        encode=SplitEncoder.from_config(config),
        batch_size=batch_size if batch_size > 0 else int(config.eval_batch_size),
        workdir=workdir,
        checkpoint_step=restored_step,
        max_pairs=max_pairs,
        inbatch_size=inbatch_size,
    )


# ----------------------------------------------------------------------------------------------
# Printing.


def format_table(results: dict) -> str:
    """A plain-text table, one row per (result, direction), metrics in %.

    Args:
      results: {label: report of `evaluate_split`}; the label names the row.
    """
    inbatch_keys = sorted(
        {k for report in results.values() for k in report["t2m"] if k.startswith("inbatch_acc@")}
    )
    label_width = max([len(str(label)) for label in results] + [5]) + 2
    header = (
        f"{'split':<{label_width}}{'protocol':<15}{'dir':<5}{'queries':>8}{'pool':>7}"
        f"{'H@1':>8}{'H@10':>8}{'MRR':>8}{'MeanR':>9}"
    )
    for key in inbatch_keys:
        header += f"{'Acc@' + key.split('@')[1]:>9}"
    if inbatch_keys:
        header += f"{'R@20':>8}"
    lines = [header, "-" * len(header)]
    for label, report in results.items():
        for direction in ("t2m", "m2t"):
            m = report[direction]
            line = (
                f"{label!s:<{label_width}}{report.get('protocol', 'pool'):<15}{direction:<5}"
                f"{m['num_queries']:>8}{m['pool_size']:>7}"
                f"{100 * m['hits@1']:>8.2f}{100 * m['hits@10']:>8.2f}{100 * m['mrr']:>8.2f}"
                f"{m['mean_rank']:>9.1f}"
            )
            for key in inbatch_keys:
                line += f"{100 * m[key]:>9.2f}" if key in m else f"{'-':>9}"
            if inbatch_keys:
                recall = m.get(f"recall@{MOMU_RECALL_K}")
                line += f"{100 * recall:>8.2f}" if recall is not None else f"{'-':>8}"
            lines.append(line)
    return "\n".join(lines)
