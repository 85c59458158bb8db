"""Batched eval-mode embedding of texts and molecules over all devices of a runner.

One jit-compiled eval-mode forward per batch shape, the variables replicated once, each batch
split over the devices, the last batch padded and masked. Texts and molecules are embedded
separately (the model's text-only and molecule-only paths), so a molecule-only split (ChEBI-20
train molecules), a list of sentences or a user's library can be embedded as well. Host batches
are built one ahead in a thread, and one device batch stays in flight while the previous one is
copied back.

With several processes the runner's mesh spans all their devices: every process walks the same
batches, builds only its own devices' chunks, and gets every row's embedding back (`fetch`).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jaxmol.data import batching
from jaxmol.data.encoding import EncodedSplit
from jaxmol.data.featurize import FeaturizedSplit
from jaxmol.data.tokenize import TokenizedTexts
from jaxmol.parallel import DataParallel


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
        # Wall seconds and rows embedded so far, per kind ('texts', 'molecules'), compiles
        # included: what the evaluation log splits its time into.
        self.seconds: collections.Counter = collections.Counter()
        self.rows: collections.Counter = collections.Counter()

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
        buckets: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Embeds texts `rows` of `tokens` (default all).

        Texts are batched in order of length (far less padding; rows never interact in eval
        mode), each batch padded to the smallest length bucket that fits it; padded rows have an
        all-zero mask and are dropped. `buckets`: the padded lengths, ascending, the last at
        least `tokens.max_length` (default `batching.eval_text_buckets`: every 32 tokens).

        Returns:
          float32 [len(rows), d]; row i embeds text rows[i].
        """
        rows = np.arange(len(tokens)) if rows is None else np.asarray(rows, np.int64)
        out = np.zeros((len(rows), self.embed_dim), np.float32)
        if len(rows) == 0:
            return out
        start_time = time.perf_counter()
        replicated = self.replicate(variables).tree
        B = self.global_batch_size(batch_size)
        D = self.runner.num_devices
        local = self.runner.local_chunks  # this process's device chunks
        if buckets is None:
            buckets = batching.eval_text_buckets(tokens.max_length)
        order = np.argsort(tokens.lengths[rows], kind="stable")  # [n] positions, short first

        def host_batches() -> Iterator[tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]]:
            for start in range(0, len(rows), B):
                positions = order[start : start + B]  # [n_b] output positions
                slots = np.full(B, -1, np.int64)  # [B] text row per slot, -1 = padding
                slots[: len(positions)] = rows[positions]
                L = batching.text_bucket(int(tokens.lengths[rows[positions]].max()), buckets)
                mine = slots.reshape(D, B // D)[local]  # [D_local, b]
                text_ids, text_mask = batching.pad_texts(tokens, mine.ravel(), L)
                shape = (*mine.shape, L)  # [D_local, b, L]
                yield positions, (text_ids.reshape(shape), text_mask.reshape(shape))

        for positions, z in self._stream(
            host_batches(), lambda x: self._text_fn(replicated, *self.runner.shard(x))
        ):
            out[positions] = z[: len(positions)]  # padded rows come last
        self.seconds["texts"] += time.perf_counter() - start_time
        self.rows["texts"] += len(rows)
        return out

    def _molecule_batches(self, rows: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
        """The slots of each global batch of `rows`, in order: int64 [D, b] molecule rows per
        device chunk, -1 = an empty slot (the tail of the last batch)."""
        B = self.global_batch_size(batch_size)
        D = self.runner.num_devices
        for start in range(0, len(rows), B):
            slots = np.full(B, -1, np.int64)  # [B] molecule row per slot, -1 = padding
            slots[: min(B, len(rows) - start)] = rows[start : start + B]
            yield slots.reshape(D, B // D)

    def molecule_budgets(
        self,
        graphs: FeaturizedSplit,
        rows: np.ndarray | None = None,
        *,
        batch_size: int,
        start: batching.GraphBudgets | None = None,
    ) -> batching.GraphBudgets:
        """The graph budget levels `embed_molecules` packs `rows` into.

        Without `start`, the levels are derived from `rows` (`batching.graph_budgets_for`).
        With `start` (the levels of earlier calls), they are `start`, with the top level
        doubled as often as a device chunk of these rows needs: levels only ever grow at the
        top, so a chunk that fits an existing level is packed exactly as before, and a long
        stream of calls (a library embedded piece by piece) compiles a handful of shapes.

        Args:
          graphs: the featurised molecules.
          rows: int [n] valid molecules of `graphs` (default every valid one).
          batch_size: as `embed_molecules`.
          start: the levels to start from, or None.

        Returns:
          Levels that fit every device chunk of every batch of `rows` (the same on every
          process: they depend on all chunks of each global batch).
        """
        rows = np.flatnonzero(graphs.valid) if rows is None else np.asarray(rows, np.int64)
        B = self.global_batch_size(batch_size)
        b = B // self.runner.num_devices
        if start is None:
            if len(rows) == 0:
                raise ValueError("molecule_budgets needs molecules or levels to start from")
            start = batching.graph_budgets_for(graphs.n_node[rows], graphs.n_edge[rows], b)
        if len(rows) == 0:
            return start
        # Every device chunk of every batch: consecutive b rows, the last ones padded.
        slots = np.full(-(-len(rows) // B) * B, -1, np.int64)
        slots[: len(rows)] = rows
        chunks = slots.reshape(-1, b)  # [num_batches * D, b]
        real = chunks >= 0
        safe = np.maximum(chunks, 0)
        need_nodes = int(np.where(real, graphs.n_node[safe], 0).sum(1).max())
        need_edges = int(np.where(real, graphs.n_edge[safe], 0).sum(1).max())
        nodes, edges = list(start.nodes), list(start.edges)
        while need_nodes + 1 > nodes[-1] or need_edges > edges[-1]:  # + 1: a padding node
            nodes.append(nodes[-1] * 2)
            edges.append(edges[-1] * 2)
        if len(nodes) == len(start.nodes):
            return start
        return batching.GraphBudgets(tuple(nodes), tuple(edges))

    def embed_molecules(
        self,
        variables: Any,
        graphs: FeaturizedSplit,
        rows: np.ndarray | None = None,
        *,
        batch_size: int,
        budgets: batching.GraphBudgets | None = None,
    ) -> np.ndarray:
        """Embeds molecules `rows` of `graphs` (default every valid one).

        Graphs are packed by `batching.pack_graphs` in per-device chunks into static node/edge
        budget levels; each batch takes the smallest level that fits all its chunks (of every
        process). The empty slots of the last batch are dropped.

        Args:
          variables: one copy of {'params', 'batch_stats'}, or `ReplicatedVariables`.
          graphs: the featurised molecules.
          rows: int [n] valid molecules of `graphs` to embed (default every valid one).
          batch_size: molecules per global batch (rounded up to a multiple of the devices).
          budgets: the levels to pack into (they must fit every chunk: see
            `molecule_budgets`, which also grows levels kept across calls); default
            `molecule_budgets(graphs, rows)`, derived from these rows.

        Returns:
          float32 [n, d]; row i embeds molecule rows[i].
        """
        rows = np.flatnonzero(graphs.valid) if rows is None else np.asarray(rows, np.int64)
        out = np.zeros((len(rows), self.embed_dim), np.float32)
        if len(rows) == 0:
            return out
        if not graphs.valid[rows].all():
            raise ValueError("embed_molecules got rows of molecules that failed featurisation")
        start_time = time.perf_counter()
        replicated = self.replicate(variables).tree
        B = self.global_batch_size(batch_size)
        local = self.runner.local_chunks  # this process's device chunks
        if budgets is None:
            budgets = self.molecule_budgets(graphs, rows, batch_size=batch_size)

        def host_batches() -> Iterator[tuple[np.ndarray, Any]]:
            for first, chunks in zip(
                range(0, len(rows), B), self._molecule_batches(rows, batch_size), strict=True
            ):
                positions = np.where(chunks.ravel() >= 0, np.arange(first, first + B), -1)  # [B]
                level = batching.graph_level(graphs, chunks, budgets)  # of the global batch
                yield positions, batching.pack_graphs(graphs, chunks[local], budgets, level=level)

        for positions, z in self._stream(
            host_batches(), lambda g: self._molecule_fn(replicated, self.runner.shard(g))
        ):
            real = positions >= 0
            out[positions[real]] = z[real]
        self.seconds["molecules"] += time.perf_counter() - start_time
        self.rows["molecules"] += len(rows)
        return out

    def embed_split(
        self, variables: Any, split: EncodedSplit, *, batch_size: int
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
        return positions, self.runner.fetch(z).reshape(-1, self.embed_dim)
