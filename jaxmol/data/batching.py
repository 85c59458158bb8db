"""Pair batches with static shapes: exact-B batches, text buckets, graph budgets, device chunks.

Every batch holds exactly B (text, molecule) pairs. The last batch of an epoch is filled up with
masked pairs (``pair_mask`` False), never dropped. Texts are padded to the smallest length bucket
that fits the batch; graphs to the smallest node/edge budget level that fits; so a jit-compiled
step sees one shape per (text bucket, graph level) pair and never recompiles inside an epoch once
each shape has been seen.

For D devices the global batch is split into D self-contained chunks of b = B / D pairs, stacked
on a leading axis. Each chunk is a jraph-style padded graph batch with local node indices:
graphs 0..b-1 are the chunk's molecules (zero nodes for a masked pair) and graph b is the padding
graph that owns the remaining nodes and edges, exactly the layout of `jraph.pad_with_graphs`.

Batch layout (numpy, host side)::

  text_ids   int32 [D, b, L]       token ids, pad id beyond each text
  text_mask  int32 [D, b, L]       1 = real token; an all-zero row is a masked pair
  graphs     jraph.GraphsTuple     nodes int32 [D, N, F], edges int32 [D, E, 3],
                                   senders/receivers int32 [D, E], n_node/n_edge int32 [D, b+1]
  pair_mask  bool  [D, b]          True = real pair
  rows       int32 [D, b]          row of the pair in the `EncodedSplit` (-1 = masked pair)

With ``pack_texts`` the texts of each device chunk are packed, first-fit decreasing, into R rows
of L tokens (L = the text bucket of the batch; R = the smallest of the fixed `text_row_levels`
that fits every chunk of the global batch), and the text keys above are replaced by::

  text_ids       int32 [D, R, L]   packed token ids, pad id where the segment is 0
  text_segments  int32 [D, R, L]   0 = padding, k = the k-th text of the row (1-based)
  text_positions int32 [D, R, L]   position of each token within its own text (0 at padding)
  text_row       int32 [D, b]      packed row holding pair i's text (0 for a masked pair)
  text_start     int32 [D, b]      offset of that text in its row (0 for a masked pair)
  text_length    int32 [D, b]      its tokens (0 = a masked pair: an all-zero mask)

The model attends only within a segment and gathers each pair's tokens back to [b, L] with the
mask ``arange(L) < text_length`` (`jaxmol.models.retrieval.PackedTexts`). Which pairs form a
batch, and their order, do not depend on packing.

The order of an epoch is a pure function of (seed, epoch), and the position in the stream is an
(epoch, step) pair, so a run can stop anywhere and continue with the same batches.

With several processes (``local_chunks``), every process computes the same global order and the
same shapes (text bucket and graph level of the *global* batch), but pads and packs only the
chunks of its own devices: the arrays above then have D_local = len(local_chunks) leading rows.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
from collections.abc import Iterator, Sequence

import jraph
import numpy as np

from jaxmol.data.encoding import EncodedSplit
from jaxmol.data.featurize import FeaturizedSplit
from jaxmol.data.tokenize import TokenizedTexts

logger = logging.getLogger(__name__)

DEFAULT_TEXT_BUCKETS = (32, 64, 128, 256)
# Graph budgets grow by this factor per level; the top level always fits the b largest molecules.
_BUDGET_GROWTH = 2
_BUDGET_MULTIPLE = 64


@dataclasses.dataclass(frozen=True)
class Position:
    """Where a batch stream stands: the next batch is batch `step` of epoch `epoch`."""

    epoch: int = 0
    step: int = 0

    def to_dict(self) -> dict:
        return {"epoch": int(self.epoch), "step": int(self.step)}

    @classmethod
    def from_dict(cls, value: dict) -> Position:
        return cls(epoch=int(value["epoch"]), step=int(value["step"]))


@dataclasses.dataclass(frozen=True)
class GraphBudgets:
    """Static per-chunk graph sizes, smallest first; a chunk uses the first level that fits.

    Attributes:
      nodes: node budget per level (real nodes + at least one padding node).
      edges: edge budget per level.
    """

    nodes: tuple[int, ...]
    edges: tuple[int, ...]

    def level_for(self, num_nodes: int, num_edges: int) -> int:
        for level, (n, e) in enumerate(zip(self.nodes, self.edges, strict=True)):
            if num_nodes + 1 <= n and num_edges <= e:
                return level
        raise ValueError(
            f"a device chunk with {num_nodes} atoms and {num_edges} directed bonds exceeds the "
            f"largest graph budget ({self.nodes[-1]} nodes, {self.edges[-1]} edges); "
            "rebuild the budgets from data that includes these molecules"
        )


def _round_up(value: float, multiple: int = _BUDGET_MULTIPLE) -> int:
    return int(math.ceil(max(value, 1) / multiple) * multiple)


def graph_budgets_for(
    n_node: np.ndarray, n_edge: np.ndarray, pairs_per_chunk: int, single_level: bool = False
) -> GraphBudgets:
    """Derives budget levels from the molecule sizes of a split.

    The base level covers a typical chunk (mean + 3 standard deviations of the sum of
    `pairs_per_chunk` random molecules); each further level doubles it; the last level fits the
    `pairs_per_chunk` largest molecules together, so no chunk of this split can overflow.

    Args:
      n_node: [M] atoms per molecule (valid molecules only).
      n_edge: [M] directed edges per molecule.
      pairs_per_chunk: b, the pairs per device chunk.
      single_level: only the level that fits everything (one compiled shape, more padding).
    """
    n_node = np.asarray(n_node, np.float64)
    n_edge = np.asarray(n_edge, np.float64)
    b = pairs_per_chunk
    base_nodes = _round_up(b * n_node.mean() + 3 * math.sqrt(b) * n_node.std() + 1)
    base_edges = _round_up(b * n_edge.mean() + 3 * math.sqrt(b) * n_edge.std())
    cap_nodes = _round_up(np.sort(n_node)[-b:].sum() + 1)
    cap_edges = _round_up(np.sort(n_edge)[-b:].sum())
    if single_level:
        return GraphBudgets((cap_nodes,), (cap_edges,))
    nodes, edges = [min(base_nodes, cap_nodes)], [min(base_edges, cap_edges)]
    while nodes[-1] < cap_nodes or edges[-1] < cap_edges:
        nodes.append(min(nodes[-1] * _BUDGET_GROWTH, cap_nodes))
        edges.append(min(edges[-1] * _BUDGET_GROWTH, cap_edges))
    return GraphBudgets(tuple(nodes), tuple(edges))


def buckets_up_to(max_length: int) -> tuple[int, ...]:
    """The default text buckets below `max_length`, then `max_length` itself."""
    return (*(b for b in DEFAULT_TEXT_BUCKETS if b < max_length), max_length)


# Evaluation batches are sorted by length, so a batch's texts differ little in length and
# power-of-two buckets pad most of them by a third (ChEBI-20 test: 32.2 % padding); buckets every
# 32 tokens halve that (16.9 %) for a few more compiled shapes (docs/performance.md).
EVAL_TEXT_BUCKET_STEP = 32


def eval_text_buckets(max_length: int, step: int = EVAL_TEXT_BUCKET_STEP) -> tuple[int, ...]:
    """The padded lengths of evaluation text batches: every multiple of `step` below
    `max_length`, then `max_length` itself (e.g. 32, 64, 96, 128 for 128)."""
    if max_length < 1 or step < 1:
        raise ValueError(f"max_length ({max_length}) and step ({step}) must be positive")
    return (*range(step, max_length, step), max_length)


def text_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length."""
    for bucket in buckets:
        if length <= bucket:
            return bucket
    raise ValueError(f"text of {length} tokens exceeds the largest bucket {buckets[-1]}")


def text_row_levels(pairs_per_chunk: int, steps: int = 8) -> tuple[int, ...]:
    """The packed-row counts R a device chunk of b texts may take, smallest first.

    Multiples of ceil(b / steps) up to b: a fixed set, so a run compiles at most `steps`
    row counts per text bucket (in practice a few: a PCdes epoch of the paper config uses
    R = 12, 16, 20 and, once, 24; docs/performance.md). The top level b always fits, since a
    text never exceeds its row.
    """
    b = int(pairs_per_chunk)
    step = -(-b // steps)
    return tuple(sorted({min(b, step * k) for k in range(1, steps + 1)}))


def pack_lengths(lengths: np.ndarray, row_length: int) -> tuple[np.ndarray, np.ndarray, int]:
    """First-fit decreasing packing of texts into rows of `row_length` tokens.

    Args:
      lengths: int [n] tokens per slot; 0 = an empty slot (placed nowhere: row 0, start 0).
      row_length: L, the tokens of a row (>= every length).

    Returns:
      (row int64 [n], start int64 [n], rows used). Longest texts first, ties in slot order,
      each into the first row with room: deterministic in `lengths`.
    """
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and lengths.max() > row_length:
        raise ValueError(f"a text of {lengths.max()} tokens exceeds the row of {row_length}")
    row = np.zeros(len(lengths), np.int64)
    start = np.zeros(len(lengths), np.int64)
    used: list[int] = []  # tokens used per open row
    for slot in np.argsort(-lengths, kind="stable"):
        n = int(lengths[slot])
        if n == 0:
            break  # empty slots sort last
        # The first open row with room, else a new one.
        r = next((i for i, fill in enumerate(used) if fill + n <= row_length), len(used))
        if r == len(used):
            used.append(0)
        row[slot], start[slot] = r, used[r]
        used[r] += n
    return row, start, len(used)


def packed_row_level(
    lengths: np.ndarray, chunk_rows: np.ndarray, row_length: int, levels: Sequence[int]
) -> int:
    """The smallest of `levels` that holds the packed texts of every chunk of `chunk_rows`
    (int [D, b], -1 = empty slot; `lengths` indexed by row): the R of a whole global batch,
    which every process must agree on."""
    chunk_rows = np.asarray(chunk_rows, np.int64)
    chunk_lengths = np.where(chunk_rows >= 0, lengths[np.maximum(chunk_rows, 0)], 0)
    needed = max(pack_lengths(c, row_length)[2] for c in chunk_lengths)
    for level in levels:
        if needed <= level:
            return int(level)
    raise ValueError(f"{needed} packed rows exceed the largest level {levels[-1]}")


def pack_texts(
    tokens: TokenizedTexts, chunk_rows: np.ndarray, row_length: int, num_rows: int
) -> dict[str, np.ndarray]:
    """Packs the texts of each device chunk into `num_rows` rows of `row_length` tokens.

    Args:
      tokens: the tokenised texts.
      chunk_rows: int [D, b], the text of each slot; -1 = an empty slot.
      row_length: L.
      num_rows: R, at least the rows first-fit decreasing needs for any chunk.

    Returns:
      The packed text keys of the module docstring: text_ids, text_segments, text_positions
      int32 [D, R, L]; text_row, text_start, text_length int32 [D, b].
    """
    chunk_rows = np.asarray(chunk_rows, np.int64)
    D, b = chunk_rows.shape
    R, L = num_rows, row_length
    ids = np.full((D, R, L), tokens.pad_id, np.int32)  # [D, R, L]
    segments = np.zeros((D, R, L), np.int32)  # [D, R, L]
    positions = np.zeros((D, R, L), np.int32)  # [D, R, L]
    lengths = np.where(chunk_rows >= 0, tokens.lengths[np.maximum(chunk_rows, 0)], 0)  # [D, b]
    row = np.zeros((D, b), np.int32)
    start = np.zeros((D, b), np.int32)
    for d in range(D):
        slot_row, slot_start, used = pack_lengths(lengths[d], L)
        if used > R:
            raise ValueError(f"chunk {d} needs {used} packed rows, more than {R}")
        segment_count = np.zeros(R, np.int32)  # texts placed per row so far
        # Texts in each row in order of their start, so segment ids count from the left.
        for slot in np.lexsort((slot_start, slot_row)):
            n = int(lengths[d, slot])
            if n == 0:
                continue
            r, s = int(slot_row[slot]), int(slot_start[slot])
            segment_count[r] += 1
            ids[d, r, s : s + n] = tokens.text(chunk_rows[d, slot])
            segments[d, r, s : s + n] = segment_count[r]
            positions[d, r, s : s + n] = np.arange(n)
        row[d], start[d] = slot_row, slot_start
    return {
        "text_ids": ids,
        "text_segments": segments,
        "text_positions": positions,
        "text_row": row,
        "text_start": start,
        "text_length": lengths.astype(np.int32),
    }


class PairBatcher:
    """Deterministic, resumable batches of exactly `batch_size` pairs over an `EncodedSplit`.

    Args:
      split: the encoded split.
      batch_size: B, pairs per global batch (a multiple of `num_devices`).
      num_devices: D, chunks per batch.
      seed: with the epoch number, fixes the order of every epoch.
      shuffle: False keeps the split order (evaluation).
      group_by_length: shuffle within text-length groups (the text buckets), cut each group
        into batches, then shuffle the batches: far less text padding than random batches.
      text_buckets: ascending padded text lengths; the last must be >= the tokenizer max length.
      graph_budgets: per-chunk graph budgets; default derived from the split.
      single_graph_budget: derive one budget level that fits every chunk (fewer compiles).
      local_chunks: the device chunks this process builds (a range of 0..D-1; default all).
      pack_texts: pack each chunk's texts into rows of the bucket length (module docstring)
        instead of one padded row per pair. Changes the layout only, never which pairs form
        a batch.
    """

    def __init__(
        self,
        split: EncodedSplit,
        *,
        batch_size: int,
        num_devices: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        group_by_length: bool = False,
        text_buckets: Sequence[int] = DEFAULT_TEXT_BUCKETS,
        graph_budgets: GraphBudgets | None = None,
        single_graph_budget: bool = False,
        local_chunks: slice | None = None,
        pack_texts: bool = False,
    ):
        if batch_size < 1 or num_devices < 1 or batch_size % num_devices:
            raise ValueError(
                f"batch_size ({batch_size}) must be a positive multiple of num_devices "
                f"({num_devices})"
            )
        buckets = tuple(sorted(int(b) for b in text_buckets))
        if buckets[-1] < split.tokens.max_length:
            raise ValueError(
                f"largest text bucket {buckets[-1]} < tokenizer max length "
                f"{split.tokens.max_length}"
            )
        if len(split.rows) == 0:
            raise ValueError(f"{split.dataset.name}: no pairs to batch")
        self.split = split
        self.batch_size = batch_size
        self.num_devices = num_devices
        self.pairs_per_chunk = batch_size // num_devices
        self.local_chunks = local_chunks or slice(0, num_devices)
        self.seed = seed
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.text_buckets = buckets
        self.pack_texts = pack_texts
        self.text_row_levels = text_row_levels(self.pairs_per_chunk)
        self.graph_budgets = graph_budgets or graph_budgets_for(
            split.graphs.n_node[split.rows],
            split.graphs.n_edge[split.rows],
            self.pairs_per_chunk,
            single_level=single_graph_budget,
        )
        lengths = split.tokens.lengths[split.rows]
        self._row_bucket = np.searchsorted(np.asarray(buckets), lengths)  # [M'] bucket index

    @property
    def num_batches(self) -> int:
        """Batches per epoch (the last one may be partly masked)."""
        return -(-len(self.split.rows) // self.batch_size)

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The row groups of one epoch: full batches, then at most one partial batch last."""
        rows = self.split.rows
        B = self.batch_size
        if not self.shuffle:
            return [rows[i : i + B] for i in range(0, len(rows), B)]
        rng = np.random.default_rng([self.seed, epoch])
        if not self.group_by_length:
            order = rows[rng.permutation(len(rows))]
            return [order[i : i + B] for i in range(0, len(order), B)]
        full, leftovers = [], []
        for bucket in range(len(self.text_buckets)):
            group = rows[self._row_bucket == bucket]
            group = group[rng.permutation(len(group))]
            cut = len(group) - len(group) % B
            full.extend(group[i : i + B] for i in range(0, cut, B))
            leftovers.append(group[cut:])
        # Leftovers of neighbouring groups share batches; only the very last batch is partial.
        rest = np.concatenate(leftovers)
        tail = [rest[i : i + B] for i in range(0, len(rest), B)]
        partial = [tail.pop()] if tail and len(tail[-1]) < B else []
        full.extend(tail)
        return [full[i] for i in rng.permutation(len(full))] + partial

    def iterate(self, start: Position = Position(), num_epochs: int | None = None) -> Iterator:
        """Yields (position_after, batch) from `start`, for `num_epochs` epochs (None: forever).

        `position_after` is the position of the *next* batch: saving it with a checkpoint taken
        after training on `batch` lets `iterate(position_after)` continue exactly.
        """
        epoch, step = start.epoch, start.step
        while num_epochs is None or epoch < start.epoch + num_epochs:
            batches = self.epoch_batches(epoch)
            for index in range(step, len(batches)):
                next_position = (
                    Position(epoch, index + 1)
                    if index + 1 < len(batches)
                    else Position(epoch + 1, 0)
                )
                yield next_position, self.make_batch(batches[index])
            epoch, step = epoch + 1, 0

    def make_batch(self, rows: np.ndarray) -> dict:
        """Builds the padded, device-chunked batch for up to B split rows (see module doc)."""
        B, D, b = self.batch_size, self.num_devices, self.pairs_per_chunk
        if len(rows) > B:
            raise ValueError(f"{len(rows)} rows for a batch of {B}")
        padded_rows = np.full(B, -1, np.int64)
        padded_rows[: len(rows)] = rows
        tokens = self.split.tokens
        lengths = tokens.lengths[np.asarray(rows, np.int64)]
        L = text_bucket(int(lengths.max()) if len(rows) else 1, self.text_buckets)
        all_chunks = padded_rows.reshape(D, b)
        level = graph_level(self.split.graphs, all_chunks, self.graph_budgets)
        chunk_rows = all_chunks[self.local_chunks]  # [D_local, b] this process's chunks
        local = chunk_rows.shape[0]
        if self.pack_texts:
            # R of the global batch: every process packs its chunks into the same shape.
            R = packed_row_level(tokens.lengths, all_chunks, L, self.text_row_levels)
            texts = pack_texts(tokens, chunk_rows, L, R)
        else:
            text_ids, text_mask = pad_texts(tokens, chunk_rows.ravel(), L)  # [D_local * b, L]
            texts = {
                "text_ids": text_ids.reshape(local, b, L),
                "text_mask": text_mask.reshape(local, b, L),
            }
        return {
            **texts,
            "graphs": pack_graphs(self.split.graphs, chunk_rows, self.graph_budgets, level=level),
            "pair_mask": chunk_rows >= 0,
            "rows": chunk_rows.astype(np.int32),
        }


def pad_texts(tokens: TokenizedTexts, rows: np.ndarray, length: int) -> tuple[np.ndarray, ...]:
    """Pads the texts `rows` of `tokens` to one length.

    Args:
      tokens: the tokenised texts.
      rows: int [B], the text of each slot; -1 = an empty slot (all-zero mask).
      length: L, at least the longest text of `rows`.

    Returns:
      text_ids int32 [B, L] (the pad id beyond each text) and text_mask int32 [B, L]
      (1 = real token).
    """
    rows = np.asarray(rows, np.int64)
    text_ids = np.full((len(rows), length), tokens.pad_id, np.int32)  # [B, L]
    text_mask = np.zeros((len(rows), length), np.int32)  # [B, L]
    for slot, row in enumerate(rows):
        if row < 0:
            continue
        ids = tokens.text(row)
        if len(ids) > length:
            raise ValueError(f"text row {row} has {len(ids)} tokens, more than {length}")
        text_ids[slot, : len(ids)] = ids
        text_mask[slot, : len(ids)] = 1
    return text_ids, text_mask


def graph_level(graphs: FeaturizedSplit, chunk_rows: np.ndarray, budgets: GraphBudgets) -> int:
    """The smallest budget level that fits every chunk of `chunk_rows` (int [D, b], -1 = empty
    slot): the level of a whole global batch, which every process must agree on."""
    chunk_rows = np.asarray(chunk_rows, np.int64)
    real = chunk_rows >= 0
    n_node = np.where(real, graphs.n_node[np.maximum(chunk_rows, 0)], 0).sum(1)  # [D]
    n_edge = np.where(real, graphs.n_edge[np.maximum(chunk_rows, 0)], 0).sum(1)  # [D]
    return max(budgets.level_for(int(n), int(e)) for n, e in zip(n_node, n_edge, strict=True))


def pack_graphs(
    graphs: FeaturizedSplit,
    chunk_rows: np.ndarray,
    budgets: GraphBudgets,
    level: int | None = None,
) -> jraph.GraphsTuple:
    """Packs molecules into D self-contained, padded jraph graph batches of one static shape.

    Chunk d holds graphs 0..b-1 (molecule `chunk_rows[d, i]`, or zero nodes where it is -1)
    and graph b, the padding graph that owns the remaining nodes and edges (the layout of
    `jraph.pad_with_graphs`). Every chunk uses the smallest budget level that fits all chunks.

    Args:
      graphs: the featurised molecules.
      chunk_rows: int [D, b], the molecule of each slot; -1 = an empty slot.
      budgets: the static node/edge budget levels.
      level: the budget level to use (default: the smallest that fits these chunks). With
        several processes, the level of the whole global batch (`graph_level`).

    Returns:
      A `jraph.GraphsTuple` with a leading device axis: nodes int32 [D, N, F], edges int32
      [D, E, 3], senders/receivers int32 [D, E], n_node/n_edge int32 [D, b + 1].
    """
    chunk_rows = np.asarray(chunk_rows, np.int64)
    D = chunk_rows.shape[0]
    real = chunk_rows >= 0  # [D, b]
    n_node = np.where(real, graphs.n_node[np.maximum(chunk_rows, 0)], 0)  # [D, b]
    n_edge = np.where(real, graphs.n_edge[np.maximum(chunk_rows, 0)], 0)  # [D, b]
    if level is None:
        level = graph_level(graphs, chunk_rows, budgets)
    N, E = budgets.nodes[level], budgets.edges[level]
    nodes = np.zeros((D, N, graphs.atom_features.shape[1]), np.int32)
    edges = np.zeros((D, E, graphs.bond_features.shape[1]), np.int32)
    senders = np.zeros((D, E), np.int32)
    receivers = np.zeros((D, E), np.int32)
    for d in range(D):
        node_cursor = edge_cursor = 0
        for row in chunk_rows[d][real[d]]:
            n0, n1 = graphs.node_offsets[row], graphs.node_offsets[row + 1]
            e0, e1 = graphs.edge_offsets[row], graphs.edge_offsets[row + 1]
            nodes[d, node_cursor : node_cursor + n1 - n0] = graphs.atom_features[n0:n1]
            span = slice(edge_cursor, edge_cursor + e1 - e0)
            edges[d, span] = graphs.bond_features[e0:e1]
            senders[d, span] = graphs.senders[e0:e1] + node_cursor
            receivers[d, span] = graphs.receivers[e0:e1] + node_cursor
            node_cursor += n1 - n0
            edge_cursor += e1 - e0
        # jraph padding layout: padding edges connect the first padding node to itself.
        senders[d, edge_cursor:] = node_cursor
        receivers[d, edge_cursor:] = node_cursor
    pad_graph_nodes = N - n_node.sum(1, keepdims=True)
    pad_graph_edges = E - n_edge.sum(1, keepdims=True)
    return jraph.GraphsTuple(
        nodes=nodes,
        edges=edges,
        senders=senders,
        receivers=receivers,
        n_node=np.concatenate([n_node, pad_graph_nodes], 1).astype(np.int32),
        n_edge=np.concatenate([n_edge, pad_graph_edges], 1).astype(np.int32),
        globals=None,
    )


def padding_fractions(batcher: PairBatcher, epoch: int = 0) -> dict:
    """Fraction of padded text positions and padded graph nodes over one epoch.

    Computed from the batch row groups and shapes only (no arrays are built). With
    ``batcher.pack_texts`` the text positions are those of the packed rows (D x R x L).
    """
    tokens, graphs = batcher.split.tokens, batcher.split.graphs
    text_real = text_total = node_real = node_total = 0
    for rows in batcher.epoch_batches(epoch):
        lengths = tokens.lengths[rows]
        text_real += int(lengths.sum())
        L = text_bucket(int(lengths.max()), batcher.text_buckets)
        padded = np.full(batcher.batch_size, -1, np.int64)
        padded[: len(rows)] = rows
        chunks = padded.reshape(batcher.num_devices, batcher.pairs_per_chunk)
        if batcher.pack_texts:
            R = packed_row_level(tokens.lengths, chunks, L, batcher.text_row_levels)
            text_total += batcher.num_devices * R * L
        else:
            text_total += batcher.batch_size * L
        sizes = [
            (int(graphs.n_node[c[c >= 0]].sum()), int(graphs.n_edge[c[c >= 0]].sum()))
            for c in chunks
        ]
        level = max(batcher.graph_budgets.level_for(n, e) for n, e in sizes)
        node_real += sum(n for n, _ in sizes)
        node_total += batcher.num_devices * batcher.graph_budgets.nodes[level]
    return {
        "text_padding": 1 - text_real / text_total,
        "node_padding": 1 - node_real / node_total,
    }


def prefetch(iterator: Iterator, size: int = 2) -> Iterator:
    """Runs `iterator` in a background thread, `size` items ahead (host batches overlap compute)."""
    items: queue.Queue = queue.Queue(maxsize=size)
    done = object()

    def produce():
        try:
            for item in iterator:
                items.put(item)
        except BaseException as error:  # re-raised in the consumer thread
            items.put(_Failure(error))
        items.put(done)

    threading.Thread(target=produce, daemon=True).start()
    while (item := items.get()) is not done:
        if isinstance(item, _Failure):
            raise item.error
        yield item


@dataclasses.dataclass
class _Failure:
    error: BaseException
