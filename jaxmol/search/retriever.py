"""A trained checkpoint as an encoder of free texts and SMILES strings.

`Retriever.from_workdir` restores the parameters and BatchNorm statistics only (no optimiser,
`jaxmol.evaluation.restore_for_eval`) and embeds through the evaluation `Embedder` on all local
devices, with the run's tokenizer and featuriser: a query embedded here is the vector the
evaluation protocols would compute for the same text or molecule.

Every embedding it returns is L2-normalised with `jaxmol.metrics.l2_normalize_rows` (float64
division, one rounding to float32), exactly as the protocols normalise before their cosine, so
a dot product of two rows is the protocols' score.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import numpy as np
from rdkit import rdBase

from jaxmol import builders
from jaxmol.data import batching, featurize
from jaxmol.data.featurize import FeaturizedSplit
from jaxmol.evaluation.embedder import Embedder
from jaxmol.evaluation.restore import describe_weights, restore_for_eval
from jaxmol.metrics import l2_normalize_rows
from jaxmol.parallel import DataParallel, select_devices

logger = logging.getLogger(__name__)


def params_hash(variables: dict) -> str:
    """SHA-256 over every array of {'params', 'batch_stats'}: path, dtype, shape and bytes.

    Two checkpoints hash alike only when every weight and statistic is bit-identical, whatever
    device they were restored on.
    """
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class _DropFeaturizeChatter(logging.Filter):
    """Drops `featurize_split`'s per-call log lines while the search reports failures itself
    (its warning would list every failing id of every chunk)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(("skipping ", "featurised "))


@contextlib.contextmanager
def quiet_featurizer() -> Iterator[None]:
    """Silences the per-call lines of `jaxmol.data.featurize` inside the block."""
    featurize_logger = logging.getLogger(featurize.__name__)
    chatter = _DropFeaturizeChatter()
    featurize_logger.addFilter(chatter)
    try:
        yield
    finally:
        featurize_logger.removeFilter(chatter)


class Retriever:
    """Embeds texts and molecules with a trained model, in eval mode, on all local devices.

    Build one with `from_workdir`; the constructor takes already restored pieces.

    Args:
      model: the eval-mode `RetrievalModel` (no device axis).
      variables: its {'params', 'batch_stats'} (one copy, any device).
      config: the run config (tokenizer, featuriser, eval batch size).
      step: the checkpoint step the variables come from.
      workdir: the training workdir (recorded in index metadata), or None.
      num_devices: devices to embed on (-1: all local devices).
      parallel: 'shard_map' or 'pmap'.
      batch_size: texts or molecules per embedding batch; 0 = the run's ``eval_batch_size``.
      weights: a description of which weights these are (for messages).

    Attributes:
      params_hash: `params_hash` of the variables (an index records it).
      embed_dim: D, the embedding size.
      featurizer: 'ogb' or 'mol2vec'.
    """

    def __init__(
        self,
        model,
        variables: dict,
        config,
        *,
        step: int,
        workdir: str | os.PathLike | None = None,
        num_devices: int = -1,
        parallel: str = "shard_map",
        batch_size: int = 0,
        weights: str = "",
    ):
        self.model = model
        self.config = config
        self.step = int(step)
        self.workdir = str(Path(workdir).expanduser().absolute()) if workdir else None
        self.weights = weights or f"checkpoint of step {self.step}"
        self.params_hash = params_hash(variables)
        self.runner = DataParallel(parallel, select_devices(num_devices))
        self.embedder = Embedder(model, self.runner)
        self.variables = self.embedder.replicate(variables)
        self.encoder = builders.split_encoder(config)
        self.featurizer = builders.featurizer_for(config)
        self.batch_size = int(batch_size) if batch_size > 0 else int(config.eval_batch_size)
        self.embed_dim = self.embedder.embed_dim
        self._molecule_program = None

    @classmethod
    def from_workdir(
        cls,
        workdir: str | os.PathLike,
        step: int | str = "best",
        *,
        num_devices: int = -1,
        parallel: str = "shard_map",
        batch_size: int = 0,
    ) -> Retriever:
        """Restores a training workdir's checkpoint (parameters and batch statistics only).

        Args:
          workdir: a training workdir (holds ``checkpoints/``).
          step: 'best' (best validation checkpoint; the latest when none was validated),
            'latest', or a step number.
          num_devices, parallel, batch_size: as the constructor.

        Raises:
          jaxmol.checkpointing.CheckpointError: no workdir, no checkpoint, or an unreadable one.
        """
        model, variables, config, restored = restore_for_eval(workdir, step)
        return cls(
            model,
            variables,
            config,
            step=restored,
            workdir=workdir,
            num_devices=num_devices,
            parallel=parallel,
            batch_size=batch_size,
            weights=describe_weights(step, restored, config),
        )

    def checkpoint_info(self) -> dict:
        """What an index records about the weights that embedded it."""
        return {"workdir": self.workdir, "step": self.step, "params_sha256": self.params_hash}

    def model_info(self) -> dict:
        """What an index records about the model and its inputs."""
        return {
            "featurizer": self.featurizer,
            "featurizer_version": featurize.FEATURIZER_VERSION,
            "rdkit_version": rdBase.rdkitVersion,
            "mol_encoder": self.config.model.mol_encoder,
            "max_text_length": int(self.config.data.max_text_length),
            "text_model_dir": builders.text_model_dir(self.config),
            "embed_dim": self.embed_dim,
        }

    def _batch_for(self, count: int) -> int:
        """The embedding batch for `count` items: the run's batch, or the next power of two
        when fewer (a single query is not padded to a whole batch; few shapes compile)."""
        return min(self.batch_size, 1 << max(count - 1, 0).bit_length())

    # -----------------------------------------------------------------------------------------
    # Texts.

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embeds texts (cut at the run's max text length).

        Args:
          texts: [N] strings.

        Returns:
          float32 [N, D], unit rows.

        Raises:
          ValueError: a text is empty or blank (naming its position), or not a string.
        """
        texts = list(texts)
        for position, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"text {position} is not a string: {text!r}")
            if not text.strip():
                raise ValueError(f"text {position} is empty: give a description to search with")
        if not texts:
            return np.zeros((0, self.embed_dim), np.float32)
        tokens = self.encoder.texts(texts)
        raw = self.embedder.embed_texts(
            self.variables, tokens, batch_size=self._batch_for(len(texts))
        )
        return l2_normalize_rows(raw, "text embeddings")

    # -----------------------------------------------------------------------------------------
    # Molecules.

    def molecule_program(self):
        """The molecule tower over the runner's devices, compiled once per retriever and graph
        shape (`LibraryMoleculeEncoder` feeds it)."""
        if self._molecule_program is None:
            model = self.model

            def molecule_fn(variables, graphs):
                z_mol, _, _ = model.apply(variables, graphs, train=False, method="embed_molecules")
                return (z_mol,)  # [b, d]

            self._molecule_program = self.runner.run(
                molecule_fn, replicated_args=(0,), out_kinds=("sharded",)
            )
        return self._molecule_program

    def featurize(self, smiles: Sequence[str], ids: Sequence[str] | None = None) -> FeaturizedSplit:
        """Featurises SMILES with the run's featuriser; unreadable ones are marked invalid and
        listed in ``failures`` (nothing is cached on disk)."""
        smiles = [s if isinstance(s, str) else "" for s in smiles]
        ids = [str(i) for i in (ids if ids is not None else range(len(smiles)))]
        with quiet_featurizer():
            return featurize.featurize_split(
                ids, smiles, featurizer=self.featurizer, on_invalid="skip", use_cache=False
            )

    def embed_featurized(self, graphs: FeaturizedSplit) -> np.ndarray:
        """Embeds the valid molecules of `graphs`, in order: float32 [num_valid, D], unit rows."""
        rows = np.flatnonzero(graphs.valid)
        if len(rows) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        raw = self.embedder.embed_molecules(
            self.variables, graphs, rows, batch_size=self._batch_for(len(rows))
        )
        return l2_normalize_rows(raw, "molecule embeddings")

    def encode_smiles(self, smiles: Sequence[str]) -> tuple[np.ndarray, list[tuple[int, str, str]]]:
        """Embeds molecules given as SMILES.

        Args:
          smiles: [N] SMILES strings.

        Returns:
          (embeddings, failures): float32 [N, D] with unit rows, row i for smiles[i]; the row of
          a molecule RDKit cannot read is NaN, and `failures` lists each of those as
          (position, SMILES, reason).
        """
        smiles = list(smiles)
        out = np.full((len(smiles), self.embed_dim), np.nan, np.float32)
        if not smiles:
            return out, []
        graphs = self.featurize(smiles)
        out[graphs.valid] = self.embed_featurized(graphs)
        bad = np.flatnonzero(~graphs.valid)
        failures = [
            (int(position), smiles[position], reason)
            for position, (_, _, reason) in zip(bad, graphs.failures, strict=True)
        ]
        return out, failures


class LibraryMoleculeEncoder:
    """Embeds a library chunk by chunk with graph budgets that persist across chunks.

    `Retriever.embed_featurized` (the evaluation `Embedder`) derives graph budget levels from the
    molecules of each call, so every chunk of a large library would bring new shapes and new
    compilations. Here the levels come from the first chunk and only grow (by doubling) when a
    later batch does not fit: a whole library compiles a handful of shapes. The same model
    function runs on the same packed layout (`batching.pack_graphs`), so embeddings equal the
    Embedder's to float rounding. The levels are recorded in the index metadata after every
    shard: they only ever grow at the top, so a resumed build picks the same level for every
    batch as an uninterrupted one.

    `prepare` (host work: slots and packing) runs in the build's reader thread, `embed` (device
    work) in the main thread, with one batch in flight while the previous one is copied back.
    """

    def __init__(self, retriever: Retriever, budgets: dict | None = None):
        self._retriever = retriever
        self._fn = retriever.molecule_program()
        self.num_devices = retriever.runner.num_devices
        self.batch = retriever.embedder.global_batch_size(retriever.batch_size)
        self.budgets: batching.GraphBudgets | None = None
        if budgets:
            self.budgets = batching.GraphBudgets(tuple(budgets["nodes"]), tuple(budgets["edges"]))

    def budgets_dict(self) -> dict | None:
        """The current budget levels as JSON (a resumed build starts from them, so it packs,
        and therefore embeds, every molecule exactly as an uninterrupted build does)."""
        if self.budgets is None:
            return None
        return {"nodes": list(self.budgets.nodes), "edges": list(self.budgets.edges)}

    def _fit_budgets(self, graphs: FeaturizedSplit, slots: list[np.ndarray]) -> None:
        rows = np.flatnonzero(graphs.valid)
        per_device = self.batch // self.num_devices
        if self.budgets is None:
            self.budgets = batching.graph_budgets_for(
                graphs.n_node[rows], graphs.n_edge[rows], per_device
            )
        need_nodes = need_edges = 0
        for chunk in slots:  # [D, b]
            real = chunk >= 0
            safe = np.maximum(chunk, 0)
            need_nodes = max(need_nodes, int(np.where(real, graphs.n_node[safe], 0).sum(1).max()))
            need_edges = max(need_edges, int(np.where(real, graphs.n_edge[safe], 0).sum(1).max()))
        nodes, edges = list(self.budgets.nodes), list(self.budgets.edges)
        while need_nodes + 1 > nodes[-1] or need_edges > edges[-1]:
            nodes.append(nodes[-1] * 2)
            edges.append(edges[-1] * 2)
        if len(nodes) > len(self.budgets.nodes):
            logger.info("graph budgets grow to %d nodes / %d edges", nodes[-1], edges[-1])
            self.budgets = batching.GraphBudgets(tuple(nodes), tuple(edges))

    def prepare(self, graphs: FeaturizedSplit) -> list[tuple[np.ndarray, object]]:
        """Packs the valid molecules of `graphs` into device batches (host work only).

        Returns:
          [(positions int64 [B] into the valid molecules, -1 = empty slot, packed graphs)].
        """
        rows = np.flatnonzero(graphs.valid)
        if len(rows) == 0:
            return []
        B, D = self.batch, self.num_devices
        slots, positions = [], []
        for start in range(0, len(rows), B):
            chunk = np.full(B, -1, np.int64)
            chunk[: min(B, len(rows) - start)] = rows[start : start + B]
            slots.append(chunk.reshape(D, B // D))
            positions.append(np.where(chunk >= 0, np.arange(start, start + B), -1))
        self._fit_budgets(graphs, slots)
        return [
            (where, batching.pack_graphs(graphs, chunk, self.budgets))
            for where, chunk in zip(positions, slots, strict=True)
        ]

    def embed(self, prepared: list[tuple[np.ndarray, object]], num_valid: int) -> np.ndarray:
        """Runs prepared batches: float32 [num_valid, D] unit rows, in molecule order."""
        out = np.zeros((num_valid, self._retriever.embed_dim), np.float32)
        if num_valid == 0:
            return out
        runner, variables = self._retriever.runner, self._retriever.variables.tree
        in_flight = None
        for where, packed in [*prepared, (None, None)]:
            launched = None
            if packed is not None:
                (z,) = self._fn(variables, runner.shard(packed))  # [D, b, d]
                launched = (where, z)
            if in_flight is not None:
                done_where, done_z = in_flight
                z_host = np.asarray(done_z).reshape(-1, out.shape[1])
                real = done_where >= 0
                out[done_where[real]] = z_host[real]
            in_flight = launched
        return l2_normalize_rows(out, "molecule embeddings")
