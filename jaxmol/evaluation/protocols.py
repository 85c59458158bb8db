"""The retrieval protocols behind one signature, and `evaluate_split`, which runs one of them.

Every protocol is a function ``(context: EvalContext, split_name) -> ProtocolOutput`` in
`PROTOCOLS` (see docs/evaluation.md):

* ``pool``: every text of the split ranks every molecule of the split, and vice versa.
* ``text2mol``: ChEBI-20, Text2Mol's protocol: texts of the split rank the molecules of every
  ChEBI-20 split (train + validation + test, deduplicated by CID); molecules of the split rank
  the texts of every ChEBI-20 split that has texts.
* ``momu``: MoMu's paragraph protocol on PCdes: top-1 accuracy inside batches of 64, plus the
  full-split ranking metrics (Recall@20 among them).
* ``momu_sentence``: the same metrics with a paragraph's score = the mean cosine over its
  sentences.

Pairs whose molecule cannot be featurised are excluded from queries and candidates and listed in
the result's ``skipped``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxmol import compile_stats, scoring
from jaxmol import metrics as metrics_lib
from jaxmol.data import datasets
from jaxmol.data.encoding import EncodedSplit, SplitEncoder
from jaxmol.data.featurize import FeaturizedSplit
from jaxmol.evaluation import report as report_lib
from jaxmol.evaluation.embedder import Embedder, ReplicatedVariables

logger = logging.getLogger(__name__)

TEXT2MOL_QUERY_SPLITS = ("chebi20/validation", "chebi20/test")
# Candidate molecules of the text2mol protocol: every ChEBI-20 molecule (33,009).
TEXT2MOL_MOLECULE_SPLITS = ("chebi20/train_molecules", "chebi20/validation", "chebi20/test")
# Candidate texts: every ChEBI-20 split with texts; 'chebi20/train' only when its file exists.
TEXT2MOL_TEXT_SPLITS = ("chebi20/train", "chebi20/validation", "chebi20/test")
TEXT2MOL_KS = (1, 5, 10, 20, 100, 500, 1000)


# The log line of `evaluate_split` (bench/bench_evaluate.py and tools/ablate.py read it).
TIME_SPLIT_FORMAT = (
    "%s (%s) evaluated in %.1f s: texts %.1f s, molecules %.1f s, other %.1f s; "
    "%d XLA programs built in %.1f s of it"
)


class ProtocolError(ValueError):
    """A protocol that cannot run on the requested split (or an unknown protocol)."""


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """What every protocol needs besides the split name.

    Attributes:
      embedder: the `Embedder` (model + runner).
      variables: the model's variables, replicated once over the runner's devices.
      encoder: the run's `SplitEncoder`.
      batch_size: pairs per embedding batch (rounded up to a multiple of the device count).
      max_pairs: > 0 uses only the first N rows of every split involved (smoke tests).
      inbatch_size: the batch of MoMu's in-batch accuracy.
      inbatch_seed: the seed of MoMu's shuffle before cutting in-batch batches (None: file
        order).
    """

    embedder: Embedder
    variables: ReplicatedVariables
    encoder: SplitEncoder
    batch_size: int
    max_pairs: int = -1
    inbatch_size: int = scoring.MOMU_INBATCH_SIZE
    inbatch_seed: int | None = scoring.MOMU_SHUFFLE_SEED


@dataclasses.dataclass(frozen=True)
class ProtocolOutput:
    """What a protocol returns.

    Attributes:
      metrics: {'t2m': metrics, 'm2t': metrics, 't2m_ranks': [Q], 'm2t_ranks': [Q]}.
      fields: extra JSON fields (pool splits, 'skipped', counts).
      arrays: the .npz arrays (ids and embeddings of queries and candidates).
    """

    metrics: dict
    fields: dict
    arrays: dict


def _skipped(split_name: str, failures) -> list[dict]:
    return [{"split": split_name, "id": i, "smiles": s, "reason": r} for i, s, r in failures]


def _encode_pairs(context: EvalContext, split_name: str) -> EncodedSplit:
    dataset = datasets.load_split_head(split_name, context.max_pairs)
    if dataset.texts is None:
        raise ProtocolError(f"{split_name} has no texts; it cannot be a query split")
    split = context.encoder(dataset)
    if len(split.rows) == 0:
        raise ProtocolError(f"{split_name}: no molecule could be featurised")
    return split


def _aligned_fields(split_name: str, split: EncodedSplit) -> tuple[dict, np.ndarray]:
    ids = np.asarray([split.dataset.ids[r] for r in split.rows])
    fields = {
        "num_pairs": len(split.dataset),
        "t2m_pool_splits": [split_name],
        "m2t_pool_splits": [split_name],
        "skipped": _skipped(split_name, split.skipped),
    }
    return fields, ids


def run_pool(context: EvalContext, split_name: str) -> ProtocolOutput:
    """Queries and candidates are the split's own pairs."""
    split = _encode_pairs(context, split_name)
    text_emb, mol_emb = context.embedder.embed_split(
        context.variables, split, batch_size=context.batch_size
    )
    fields, ids = _aligned_fields(split_name, split)
    arrays = {"query_ids": ids, "text_ids": ids, "text_emb": text_emb}
    arrays |= {"mol_ids": ids, "mol_emb": mol_emb}
    return ProtocolOutput(scoring.pool_metrics_from_embeddings(text_emb, mol_emb), fields, arrays)


def run_momu(context: EvalContext, split_name: str) -> ProtocolOutput:
    """The pool protocol plus MoMu's in-batch accuracy and Recall@20."""
    pool = run_pool(context, split_name)
    arrays = pool.arrays
    result = scoring.momu_metrics_from_embeddings(
        arrays["text_emb"],
        arrays["mol_emb"],
        inbatch_size=context.inbatch_size,
        shuffle_seed=context.inbatch_seed,
    )
    return ProtocolOutput(result, pool.fields, arrays)


def run_momu_sentence(context: EvalContext, split_name: str) -> ProtocolOutput:
    """MoMu's sentence level: a paragraph scores a molecule by its sentences' mean cosine."""
    split = _encode_pairs(context, split_name)
    embedder, variables, batch_size = context.embedder, context.variables, context.batch_size
    texts = split.dataset.texts
    sentences, sentence_paragraph = [], []
    for paragraph, row in enumerate(split.rows):
        kept = scoring.split_sentences(texts[row])
        sentences.extend(kept)
        sentence_paragraph.extend([paragraph] * len(kept))
    fields, ids = _aligned_fields(split_name, split)
    sentence_ids = [f"{ids[p]}#{k}" for p, k in _enumerate_within(sentence_paragraph)]
    tokens = context.encoder.texts(sentences, ids=sentence_ids)
    sentence_emb = embedder.embed_texts(variables, tokens, batch_size=batch_size)  # [S, d]
    mol_emb = embedder.embed_molecules(variables, split.graphs, split.rows, batch_size=batch_size)
    sentence_paragraph = np.asarray(sentence_paragraph, np.int64)
    paragraph_emb, scores = scoring.sentence_paragraph_scores(
        sentence_emb, sentence_paragraph, mol_emb
    )
    result = scoring.momu_metrics_from_scores(
        scores, inbatch_size=context.inbatch_size, shuffle_seed=context.inbatch_seed
    )
    fields["num_sentences"] = len(sentences)
    arrays = {"query_ids": ids, "text_ids": ids, "text_emb": paragraph_emb}
    arrays |= {"mol_ids": ids, "mol_emb": mol_emb}
    arrays |= {"sentence_emb": sentence_emb, "sentence_paragraph": sentence_paragraph}
    return ProtocolOutput(result, fields, arrays)


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


def run_text2mol(context: EvalContext, split_name: str) -> ProtocolOutput:
    """Text2Mol's ChEBI-20 protocol: the split's texts rank all 33,009 ChEBI-20 molecules."""
    embedder, variables, batch_size = context.embedder, context.variables, context.batch_size
    text_splits = text2mol_text_splits()
    loaded: dict[str, tuple[datasets.PairDataset, FeaturizedSplit]] = {}
    for name in dict.fromkeys((*TEXT2MOL_MOLECULE_SPLITS, *text_splits)):
        dataset = datasets.load_split_head(name, context.max_pairs)
        loaded[name] = (dataset, context.encoder.molecules(dataset))

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
        mol_blocks.append(embedder.embed_molecules(variables, graphs, rows, batch_size=batch_size))
        mol_ids += [dataset.ids[r] for r in rows]
        mol_split += [name] * len(rows)
    text_ids, text_split, text_blocks = [], [], []
    for name, rows in pool(text_splits):
        dataset, _ = loaded[name]
        tokens = context.encoder.texts(dataset.texts, ids=dataset.ids)
        text_blocks.append(embedder.embed_texts(variables, tokens, rows, batch_size=batch_size))
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
    result = scoring.both_directions(
        metrics_lib.rank_counts_from_embeddings(text_emb[query_in_texts], mol_emb, query_in_mols),
        metrics_lib.rank_counts_from_embeddings(mol_emb[query_in_mols], text_emb, query_in_texts),
        num_texts=len(text_ids),
        num_molecules=len(mol_ids),
        ks=TEXT2MOL_KS,
    )
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
    return ProtocolOutput(result, fields, arrays)


PROTOCOLS: dict[str, Callable[[EvalContext, str], ProtocolOutput]] = {
    "pool": run_pool,
    "text2mol": run_text2mol,
    "momu": run_momu,
    "momu_sentence": run_momu_sentence,
}


def check_protocol(split_name: str, protocol: str) -> None:
    """Raises `ProtocolError` for an unknown protocol or a split it does not apply to."""
    if protocol not in PROTOCOLS:
        raise ProtocolError(f"unknown protocol {protocol!r}; expected one of {tuple(PROTOCOLS)}")
    if protocol == "text2mol" and split_name not in TEXT2MOL_QUERY_SPLITS:
        raise ProtocolError(
            f"the text2mol protocol ranks against every ChEBI-20 split; its query split must be "
            f"one of {TEXT2MOL_QUERY_SPLITS}, got {split_name!r}"
        )


def evaluate_split(
    embedder: Embedder,
    variables: Any,
    split_name: str,
    *,
    protocol: str = "pool",
    encoder: SplitEncoder,
    batch_size: int,
    workdir: str | Path | None,
    checkpoint_step: int,
    max_pairs: int = -1,
    inbatch_size: int = scoring.MOMU_INBATCH_SIZE,
    inbatch_seed: int | None = scoring.MOMU_SHUFFLE_SEED,
    weights: str = "",
) -> dict:
    """Evaluates one split with one protocol and writes its result files.

    Args:
      embedder: the `Embedder` (model + runner).
      variables: {'params', 'batch_stats'} (one copy) or `ReplicatedVariables`.
      split_name: a `datasets.load_split` name.
      protocol: a key of `PROTOCOLS`.
      encoder: the run's `SplitEncoder` (`jaxmol.builders.split_encoder`).
      batch_size: pairs per embedding batch (rounded up to a multiple of the device count).
      workdir: results go to ``workdir/eval/<stem>.json`` and ``.npz`` (None: not written).
      checkpoint_step: recorded in the result.
      max_pairs: > 0 uses only the first N rows of every split involved (smoke tests).
      inbatch_size: the batch of MoMu's in-batch accuracy.
      inbatch_seed: the seed of MoMu's shuffle before cutting batches (None: file order).
      weights: which weights these are, in words (recorded as 'weights').

    Returns:
      The JSON report: 't2m' and 'm2t' metric blocks, 'split', 'protocol', 'checkpoint_step',
      'tie_policy', 't2m_pool_splits', 'm2t_pool_splits', 'skipped' (every excluded pair with
      its split, id, SMILES and reason), 'num_skipped', 'num_pairs', 'max_pairs', 'files'.

    Raises:
      ProtocolError: unknown protocol, or a split the protocol does not apply to.
      jaxmol.data.datasets.DataError: unknown split or bad data file.
    """
    check_protocol(split_name, protocol)
    start = time.perf_counter()
    clock = compile_stats.install()
    compiled_before = clock.snapshot()
    embedded_before = embedder.seconds.copy()
    context = EvalContext(
        embedder,
        embedder.replicate(variables),
        encoder,
        batch_size,
        max_pairs,
        inbatch_size,
        inbatch_seed,
    )
    output = PROTOCOLS[protocol](context, split_name)
    elapsed = time.perf_counter() - start
    embedded = embedder.seconds - embedded_before
    compiled = clock.snapshot() - compiled_before
    # Texts and molecules include their compiles; "other" is loading, tokenizing, featurising
    # (or reading the featurisation cache) and ranking.
    logger.info(
        TIME_SPLIT_FORMAT,
        split_name,
        protocol,
        elapsed,
        embedded["texts"],
        embedded["molecules"],
        elapsed - embedded["texts"] - embedded["molecules"],
        compiled.programs,
        compiled.seconds,
    )
    report = {
        "split": split_name,
        "protocol": protocol,
        "checkpoint_step": int(checkpoint_step),
        "weights": weights or f"step {int(checkpoint_step)}",
        "tie_policy": metrics_lib.TIE_POLICY,
        "t2m": output.metrics["t2m"],
        "m2t": output.metrics["m2t"],
        **output.fields,
        "num_skipped": len(output.fields["skipped"]),
        "max_pairs": int(max_pairs),
    }
    if workdir is not None:
        arrays = {
            **output.arrays,
            **{
                f"{direction}_{key}": output.metrics[f"{direction}_{key}"]
                for direction in ("t2m", "m2t")
                for key in ("ranks", "num_tied")
            },
        }
        report["files"] = report_lib.write_result(workdir, split_name, protocol, report, arrays)
    return report
